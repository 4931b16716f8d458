# Toy models with ground truth: synthetic activations from a known sparse dictionary
# (saeflow.toy), the SAE trainers run on them, and a recovery table + figure per SAE.
# toy/{toy}/acts.h5 has the layout of acts/{model}/{corpus}/{site}.h5, so saeflow.train reads it
# unchanged; toy SAEs are kept out of SAES (they have no language model to evaluate against).


include: "toy_common.smk"


rule toy_acts:
    output:
        acts="toy/{toy}/acts.h5",
        dictionary="toy/{toy}/dictionary.h5",
    log:
        "logs/toy_acts/{toy}.log",
    wildcard_constraints:
        toy=alternation(TOY_DATASETS),
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        args=toy_generate_args,
        code=code_version("toy"),
    shell:
        "python -m saeflow.toy generate --out {output.acts} --dictionary {output.dictionary}"
        " --name {wildcards.toy} {params.args} > {log} 2>&1"


rule train_toy_sae:
    input:
        acts="toy/{toy}/acts.h5",
    output:
        cfg="toy/{toy}/saes/{variant}/cfg.json",
        weights="toy/{toy}/saes/{variant}/sae_weights.safetensors",
    log:
        "logs/train_sae/toy/{toy}/{variant}.log",
    benchmark:
        "benchmarks/train_sae/toy/{toy}/{variant}.tsv"
    wildcard_constraints:
        toy=alternation(TOY_DATASETS),
        variant=alternation(TOY_SAES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        args=toy_train_args,
        seed=TOY.get("seed", 0),
        code=code_version("train", "topk", "sae_lens_train", "saex_train", "techniques", "batches"),
    shell:
        "python -m saeflow.train --acts {input.acts} --out toy/{wildcards.toy}/saes/{wildcards.variant}"
        " --checkpoint-dir checkpoints/toy/{wildcards.toy}/{wildcards.variant} {params.args}"
        " --train-log logs/train_sae/toy/{wildcards.toy}/{wildcards.variant}.train_log.csv"
        " --seed {params.seed} --threads {threads} --no-progress > {log} 2>&1"


rule toy_recovery:
    input:
        unpack(toy_recovery_inputs),
    output:
        table="tables/toy_recovery.csv",
    log:
        "logs/toy_recovery/toy_recovery.log",
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        saes=toy_sae_pairs,
        n_eval=TOY.get("n_eval", 8192),
        code=code_version("toy"),
    shell:
        "python -m saeflow.toy recovery --dictionary {input.dictionaries} --sae {params.saes}"
        " --n-eval {params.n_eval} --out {output.table} > {log} 2>&1"


rule plot_toy_recovery:
    input:
        table="tables/toy_recovery.csv",
    output:
        pdf=report(
            "plots/toy_recovery.pdf",
            caption="../report/toy_recovery.rst",
            category="Training techniques",
            labels={"figure": "toy recovery"},
        ),
    log:
        "logs/plot_toy_recovery/toy_recovery.log",
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        width=TOY.get("figure", {}).get("width", 7.0),
        height=TOY.get("figure", {}).get("height", 3.0),
        code=code_version("toy"),
    shell:
        "python -m saeflow.toy plot --table {input.table} --out {output.pdf}"
        " --width {params.width} --height {params.height} > {log} 2>&1"
