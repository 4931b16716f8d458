# SAE evaluation: the Dark Matter SAEInfoObject as files, plus per-SAE metrics and a summary table.


def sae_model_path(wildcards):
    return model_path(SAES[wildcards.sae_id]["model"])


def all_metrics(wildcards):
    return [f"sae_eval/{sae_id}/{EVAL_CORPUS}.metrics.json" for sae_id in sorted(SAES)]


def csr_max_l0_flag(wildcards):
    """--csr-max-l0 unless evaluation.csr_max_l0 is null (then every file keeps its CSR)."""
    limit = config["evaluation"]["csr_max_l0"]
    return "" if limit is None else f"--csr-max-l0 {limit}"


def error_sae_cfgs(wildcards):
    """Figure 8's error SAEs (autointerp.smk's AI_SAES): rows of the table from their training."""
    return [f"saes/{sae_id}/cfg.json" for sae_id in AI_SAES]


rule evaluate_sae:
    input:
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        acts=sae_eval_acts,
        tokens="data/tokens/{corpus}.h5",
        model=sae_model_input,
    output:
        info="sae_eval/{sae_id}/{corpus}.h5",
        metrics="sae_eval/{sae_id}/{corpus}.metrics.json",
    params:
        model=sae_model_path,
        site=sae_site,
        downstream_seqs=config["evaluation"]["downstream_seqs"],
        batch_size=config["evaluation"]["batch_size"],
        chunk=config["evaluation"]["chunk_tokens"],
        csr_max_l0=csr_max_l0_flag,
        skip=config["activations"]["skip_positions"],
        code=code_version("sae_eval", "metrics", "saes"),
    log:
        "logs/evaluate_sae/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/evaluate_sae/{sae_id}/{corpus}.tsv"
    threads: 2
    resources:
        mem_mb=sae_model_mem_mb,
        runtime=60,
        gpu=1,
    shell:
        "python -m saeflow.sae_eval evaluate --sae saes/{wildcards.sae_id} --acts {input.acts}"
        " --model {params.model} --tokens {input.tokens} --site {params.site}"
        " --out {output.info} --metrics {output.metrics} --sae-id {wildcards.sae_id}"
        " --downstream-seqs {params.downstream_seqs} --batch-size {params.batch_size}"
        " --skip-positions {params.skip} --chunk-tokens {params.chunk} {params.csr_max_l0}"
        " --threads {threads} --device auto > {log} 2>&1"


rule summarize_saes:
    input:
        metrics=all_metrics,
        error_saes=error_sae_cfgs,
    output:
        table="tables/sae_metrics.csv",
    params:
        code=code_version("sae_eval"),
    log:
        "logs/summarize_saes/summary.log",
    shell:
        "python -m saeflow.sae_eval summarize --metrics {input.metrics}"
        " --error-saes {input.error_saes} --out {output.table} > {log} 2>&1"
