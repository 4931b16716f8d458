# Feature analysis: per-latent statistics on the evaluation corpus, loaded into the feature
# database the viewer serves, and a static dashboard of the most frequent latents per SAE.
#   analysis/{sae}/features.jsonl.gz, summary.json   analyze_features
#   analysis/{sae}/loaded.json                       load_features (stamp; the rows live in the DB)
#   plots/dashboards/{sae}/index.html                feature_dashboard


rule analyze_features:
    input:
        info=f"sae_eval/{{sae_id}}/{EVAL_CORPUS}.h5",
        acts=analysis_acts,
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        model=sae_model_input,
    output:
        features="analysis/{sae_id}/features.jsonl.gz",
        summary="analysis/{sae_id}/summary.json",
    log:
        "logs/analyze_features/{sae_id}.log",
    benchmark:
        "benchmarks/analyze_features/{sae_id}.tsv"
    wildcard_constraints:
        sae_id=alternation(AN_SAES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=sae_model_mem_mb,
        runtime=60,
    params:
        model=sae_model_path,
        options=analysis_options,
        code=code_version("analysis.analyze", "analysis.stats"),
    shell:
        "python -m saeflow.analysis.analyze --info {input.info} --acts {input.acts}"
        " --sae saes/{wildcards.sae_id} --model {params.model} --sae-id {wildcards.sae_id}"
        " --out {output.features} --summary {output.summary} {params.options}"
        " --threads {threads} > {log} 2>&1"


rule load_features:
    input:
        features="analysis/{sae_id}/features.jsonl.gz",
        summary="analysis/{sae_id}/summary.json",
        metrics=f"sae_eval/{{sae_id}}/{EVAL_CORPUS}.metrics.json",
        autointerp=analysis_autointerp,
    output:
        stamp="analysis/{sae_id}/loaded.json",
    log:
        "logs/load_features/{sae_id}.log",
    wildcard_constraints:
        sae_id=alternation(AN_SAES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
        feature_db=1,
    params:
        db=AN["db"],
        autointerp=analysis_autointerp_flag,
        code=code_version("analysis.store"),
    shell:
        "python -m saeflow.analysis.store load --db {params.db} --sae-id {wildcards.sae_id}"
        " --features {input.features} --summary {input.summary} --metrics {input.metrics}"
        " {params.autointerp} --stamp {output.stamp} > {log} 2>&1"


rule feature_dashboard:
    input:
        features="analysis/{sae_id}/features.jsonl.gz",
        summary="analysis/{sae_id}/summary.json",
        metrics=f"sae_eval/{{sae_id}}/{EVAL_CORPUS}.metrics.json",
    output:
        html=report(
            "plots/dashboards/{sae_id}/index.html",
            caption="../report/dashboard.rst",
            category="Feature dashboards",
            labels={"sae": "{sae_id}"},
        ),
    log:
        "logs/feature_dashboard/{sae_id}.log",
    wildcard_constraints:
        sae_id=alternation(AN_SAES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        n=AN["dashboard_latents"],
        code=code_version("analysis.dashboard"),
    shell:
        "python -m saeflow.analysis.dashboard --features {input.features}"
        " --summary {input.summary} --metrics {input.metrics} --n {params.n}"
        " --out {output.html} > {log} 2>&1"
