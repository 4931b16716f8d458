# Dark Matter analyses ("Decomposing the Dark Matter of SAEs"): per SAE, the linear / nonlinear
# split of its error and gradient pursuit on its decoder; over the configured family, the width
# power laws and the tables behind plots/figure1-4.pdf (drawn in figures.smk).
# Per-SAE jobs take 1 thread: they are independent, so -c2 runs two at once, and small
# multi-threaded GEMMs stall on a loaded machine.

DM = config["dark_matter"]
DM_SAES = sorted(i for i, s in SAES.items() if s.get("family") == DM["family"])
DM_FIGURES = ["1", "2", "3", "4"]


def family_files(pattern):
    """One path per SAE of the Dark Matter family on the evaluation corpus, in DM_SAES order."""
    return [pattern.format(sae_id=sae_id, corpus=EVAL_CORPUS) for sae_id in DM_SAES]


def figure_table_args(wildcards):
    """Only the knobs a figure's table uses, so a change rebuilds only that table."""
    if wildcards.figure == "1":
        return f"--headline-l0 {DM['headline_l0']} --extrapolate {DM['extrapolate']}"
    return ""


rule error_split:
    input:
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
    output:
        split="dark_matter/{sae_id}/{corpus}/split.h5",
        fit="dark_matter/{sae_id}/{corpus}/fit.h5",
        metrics="dark_matter/{sae_id}/{corpus}/metrics.json",
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    params:
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.error_split", "dark_matter.regression"),
    log:
        "logs/error_split/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/error_split/{sae_id}/{corpus}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m saeflow.dark_matter.error_split --acts {input.acts}"
        " --sae-eval {input.sae_eval} --out {output.split} --fit {output.fit}"
        " --metrics {output.metrics} --test-fraction {params.test_fraction}"
        " --seed {params.seed} --chunk-tokens {params.chunk} --threads {threads}"
        " > {log} 2>&1"


rule encoder_pursuit:
    input:
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
    output:
        pursuit="dark_matter/{sae_id}/{corpus}/pursuit.json",
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    params:
        tokens=DM["pursuit_tokens"],
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["pursuit_chunk_tokens"],
        read_chunk=DM["chunk_tokens"],
        code=code_version(
            "dark_matter.encoder_pursuit",
            "dark_matter.pursuit",
            "dark_matter.regression",
            "dark_matter.error_split",
        ),
    log:
        "logs/encoder_pursuit/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/encoder_pursuit/{sae_id}/{corpus}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m saeflow.dark_matter.encoder_pursuit --sae saes/{wildcards.sae_id}"
        " --acts {input.acts} --sae-eval {input.sae_eval} --out {output.pursuit}"
        " --sae-id {wildcards.sae_id} --tokens {params.tokens}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --chunk-tokens {params.chunk} --read-chunk-tokens {params.read_chunk}"
        " --threads {threads} > {log} 2>&1"


rule dark_matter_scaling:
    input:
        cfg=family_files("saes/{sae_id}/cfg.json"),
        eval_metrics=family_files("sae_eval/{sae_id}/{corpus}.metrics.json"),
        split_metrics=family_files("dark_matter/{sae_id}/{corpus}/metrics.json"),
        pursuit=family_files("dark_matter/{sae_id}/{corpus}/pursuit.json"),
    output:
        saes="tables/dark_matter_saes.csv",
        fits="tables/dark_matter_power_laws.csv",
    params:
        sae_ids=DM_SAES,
        n_boot=DM["n_boot"],
        seed=DM["seed"],
        code=code_version("dark_matter.scaling", "dark_matter.power_law"),
    log:
        "logs/dark_matter_scaling/scaling.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m saeflow.dark_matter.scaling collect --sae-ids {params.sae_ids}"
        " --sae-cfg {input.cfg} --eval-metrics {input.eval_metrics}"
        " --split-metrics {input.split_metrics} --pursuit {input.pursuit}"
        " --saes-out {output.saes} --fits-out {output.fits}"
        " --n-boot {params.n_boot} --seed {params.seed} > {log} 2>&1"


rule dark_matter_figure_table:
    input:
        saes="tables/dark_matter_saes.csv",
        fits="tables/dark_matter_power_laws.csv",
    output:
        table="tables/figure{figure}.csv",
    wildcard_constraints:
        figure=alternation(DM_FIGURES),
    params:
        args=figure_table_args,
        code=code_version("dark_matter.scaling", "dark_matter.power_law"),
    log:
        "logs/dark_matter_figure_table/figure{figure}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m saeflow.dark_matter.scaling figure --figure {wildcards.figure}"
        " --saes {input.saes} --fits {input.fits} --out {output.table} {params.args}"
        " > {log} 2>&1"
