# SAEs: trained from cached activations (families expanded in common.smk) or imported pretrained,
# all in the SAELens layout at saes/{sae_id}/.


rule train_sae:
    input:
        acts=sae_train_acts,
    output:
        cfg="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
    log:
        "logs/train_sae/{sae_id}.log",
    benchmark:
        "benchmarks/train_sae/{sae_id}.tsv"
    wildcard_constraints:
        sae_id=alternation(TRAINED),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        args=train_args,
        site=sae_site,
        model=sae_model,
        code=code_version("train", "topk", "sae_lens_train", "saex_train", "techniques", "batches"),
    shell:
        "python -m saeflow.train --acts {input.acts} --out saes/{wildcards.sae_id}"
        " --checkpoint-dir checkpoints/{wildcards.sae_id} {params.args}"
        " --train-log logs/train_sae/{wildcards.sae_id}.train_log.csv"
        " --hook-name {params.site} --model-name {params.model} --threads {threads}"
        " --device auto > {log} 2>&1"


rule import_sae:
    output:
        cfg="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
    log:
        "logs/import_sae/{sae_id}.log",
    wildcard_constraints:
        sae_id=alternation(PRETRAINED),
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        args=import_args,
        code=code_version("saes"),
    shell:
        "python -m saeflow.saes import --out saes/{wildcards.sae_id} {params.args} > {log} 2>&1"
