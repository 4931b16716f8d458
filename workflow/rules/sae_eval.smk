# SAE evaluation: the Dark Matter SAEInfoObject as files, plus per-SAE metrics and a summary table.


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
    log:
        "logs/evaluate_sae/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/evaluate_sae/{sae_id}/{corpus}.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=sae_model_mem_mb,
        runtime=60,
        gpu=1,
    params:
        model=sae_model_path,
        site=sae_site,
        downstream_seqs=config["evaluation"]["downstream_seqs"],
        batch_size=config["evaluation"]["batch_size"],
        chunk=config["evaluation"]["chunk_tokens"],
        csr_max_l0=csr_max_l0_flag,
        skip=config["activations"]["skip_positions"],
        code=code_version("sae_eval", "metrics", "saes"),
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
    log:
        "logs/summarize_saes/summary.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        code=code_version("sae_eval"),
    shell:
        "python -m saeflow.sae_eval summarize --metrics {input.metrics}"
        " --error-saes {input.error_saes} --out {output.table} > {log} 2>&1"
