# Sparse probing ("Are Sparse Autoencoders Useful?"): datasets from the sae-probes wheel,
# last-token activations (one job per model), sparse SAE latents (one job per SAE), probes per
# (site or SAE, regime), combined CSVs and figures per regime.


rule probing_dataset_table:
    output:
        table="tables/probing_datasets.csv",
    log:
        "logs/probing_dataset_table/table.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        names=" ".join(f"--dataset {d}" for d in probing_datasets()),
        custom=probing_custom_args(),
        max_rows=PROBING.get("max_rows") or 10**9,
        code=code_version("probing.datasets"),
    shell:
        "python -m saeflow.probing.datasets table {params.names} {params.custom}"
        " --max-rows {params.max_rows} --out {output.table} > {log} 2>&1"


rule probing_acts:
    input:
        model=model_input,
    output:
        [f"probing/acts/{{model}}/{d}.h5" for d in probing_act_names()],
    log:
        "logs/probing_acts/{model}.log",
    benchmark:
        "benchmarks/probing_acts/{model}.tsv"
    wildcard_constraints:
        model=alternation([PROBING_MODEL] if PROBING_MODEL else []),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=240,
        gpu=1,
    params:
        model=model_path_param,
        pairs=probing_acts_args,
        sites=probing_site_args(),
        custom=probing_custom_args(),
        max_rows=PROBING.get("max_rows") or 10**9,
        max_length=PROBING.get("max_length", 1024),
        batch_tokens=PROBING.get("batch_tokens", 4096),
        dtype=model_dtype,
        code=code_version("probing.acts", "probing.datasets"),
    shell:
        "python -m saeflow.probing.acts --model {params.model} --model-name {wildcards.model}"
        " {params.sites} {params.pairs} {params.custom} --max-rows {params.max_rows}"
        " --max-length {params.max_length} --batch-tokens {params.batch_tokens}"
        " --dtype {params.dtype} --threads {threads} --device auto > {log} 2>&1"


rule probing_sae_acts:
    input:
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        acts=probing_all_acts,
    output:
        [f"probing/sae_acts/{{sae_id}}/{d}.h5" for d in probing_act_names()],
    log:
        "logs/probing_sae_acts/{sae_id}.log",
    benchmark:
        "benchmarks/probing_sae_acts/{sae_id}.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        pairs=probing_sae_acts_args,
        site=sae_site,
        code=code_version("probing.sae_acts"),
    shell:
        "python -m saeflow.probing.sae_acts --sae saes/{wildcards.sae_id} --sae-id {wildcards.sae_id}"
        " --site {params.site} {params.pairs} --threads {threads} > {log} 2>&1"


rule probing_baseline:
    input:
        acts=probing_regime_acts,
        ood=probing_regime_ood_acts,
    output:
        table="probing/baselines/{site}/{regime}.csv",
    log:
        "logs/probing_baseline/{site}/{regime}.log",
    benchmark:
        "benchmarks/probing_baseline/{site}/{regime}.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        acts_args=probing_acts_list,
        ood_args=probing_ood_args,
        layer=probing_site_layer,
        values=probing_values,
        methods=probing_methods,
        backend=PROBING.get("backend", "torch"),
        seed=PROBING.get("seed", 42),
        code=code_version(
            "probing.run",
            "probing.probe",
            "probing.engine",
            "probing.regimes",
            "probing.baselines",
        ),
    shell:
        "python -m saeflow.probing.run baseline {params.acts_args} {params.ood_args}"
        " --site {wildcards.site}"
        " --layer {params.layer} --regime {wildcards.regime} --values {params.values}"
        " --methods {params.methods} --backend {params.backend} --seed {params.seed}"
        " --threads {threads} --out {output.table} > {log} 2>&1"


rule probing_sae_probes:
    input:
        acts=probing_regime_sae_acts,
        ood=probing_regime_ood_sae_acts,
    output:
        table="probing/sae_probes/{sae_id}/{regime}.csv",
    log:
        "logs/probing_sae_probes/{sae_id}/{regime}.log",
    benchmark:
        "benchmarks/probing_sae_probes/{sae_id}/{regime}.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        acts_args=probing_sae_acts_list,
        ood_args=probing_ood_args,
        layer=probing_sae_layer,
        values=probing_values,
        ks=probing_ks,
        ranking=PROBING.get("ranking", "normalized_mean_diff"),
        binarize="--binarize" if PROBING.get("binarize") else "",
        threshold=PROBING.get("binarize_threshold", 1.0),
        backend=PROBING.get("backend", "torch"),
        seed=PROBING.get("seed", 42),
        code=code_version("probing.run", "probing.probe", "probing.engine", "probing.regimes"),
    shell:
        "python -m saeflow.probing.run sae {params.acts_args} {params.ood_args}"
        " --sae-id {wildcards.sae_id}"
        " --layer {params.layer} --regime {wildcards.regime} --values {params.values}"
        " --ks {params.ks} --ranking {params.ranking} {params.binarize}"
        " --binarize-threshold {params.threshold}"
        " --backend {params.backend} --seed {params.seed} --threads {threads}"
        " --out {output.table} > {log} 2>&1"


rule probing_figure:
    input:
        baselines=probing_regime_baselines,
        saes=probing_regime_saes,
    output:
        baselines="tables/probing/{regime}/baseline_results.csv",
        sae="tables/probing/{regime}/all_metrics.csv",
        table="plots/probing/{regime}.csv",
        pdf=report(
            "plots/probing/{regime}.pdf",
            caption="../report/probing_regime.rst",
            category="Sparse probing",
            labels={"regime": "{regime}"},
        ),
    log:
        "logs/probing_figure/{regime}.log",
    wildcard_constraints:
        regime=alternation(REGIMES),
    conda:
        "../../envs/saeflow.yaml"
    params:
        args=probing_figure_args,
        code=code_version("probing.figures"),
    shell:
        "python -m saeflow.probing.figures --regime {wildcards.regime} {params.args}"
        " --out-baselines {output.baselines} --out-sae {output.sae} --table {output.table}"
        " --pdf {output.pdf} > {log} 2>&1"


rule probing_sweeps:
    input:
        baselines="tables/probing/normal/baseline_results.csv",
        sae="tables/probing/normal/all_metrics.csv",
    output:
        k_table="plots/probing/k_vs_auc.csv",
        k_pdf=report(
            "plots/probing/k_vs_auc.pdf",
            caption="../report/probing_sweeps.rst",
            category="Sparse probing",
            labels={"figure": "k vs AUC"},
        ),
        layer_table="plots/probing/by_layer.csv",
        layer_pdf=report(
            "plots/probing/by_layer.pdf",
            caption="../report/probing_sweeps.rst",
            category="Sparse probing",
            labels={"figure": "methods by layer"},
        ),
    log:
        "logs/probing_sweeps/normal.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        code=code_version("probing.sweeps"),
    shell:
        "python -m saeflow.probing.sweeps --baselines {input.baselines} --sae {input.sae}"
        " --k-table {output.k_table} --k-pdf {output.k_pdf}"
        " --layer-table {output.layer_table} --layer-pdf {output.layer_pdf} > {log} 2>&1"


rule probing_multi_acts:
    input:
        model=model_input,
    output:
        [f"probing/multi_acts/{{model}}/{d}.h5" for d in probing_multi_datasets()],
    log:
        "logs/probing_multi_acts/{model}.log",
    benchmark:
        "benchmarks/probing_multi_acts/{model}.tsv"
    wildcard_constraints:
        model=alternation([PROBING_MODEL] if MULTI_SITE else []),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=1,
    params:
        model=model_path_param,
        pairs=lambda wildcards, output: " ".join(
            f"--dataset {d} --out {o}" for d, o in zip(probing_multi_datasets(), output)
        ),
        site=MULTI_SITE,
        custom=probing_custom_args(),
        max_rows=MULTI_TOKEN.get("max_rows", 300),
        max_length=MULTI_TOKEN.get("max_length", 256),
        batch_tokens=PROBING.get("batch_tokens", 4096),
        dtype=model_dtype,
        code=code_version("probing.multi_token", "probing.acts", "probing.datasets"),
    shell:
        "python -m saeflow.probing.multi_token acts --model {params.model}"
        " --model-name {wildcards.model} --site {params.site} {params.pairs} {params.custom}"
        " --max-rows {params.max_rows} --max-length {params.max_length}"
        " --batch-tokens {params.batch_tokens} --dtype {params.dtype} --threads {threads}"
        " --device auto > {log} 2>&1"


rule probing_multi_token:
    input:
        acts=probing_multi_acts,
        saes=probing_multi_saes,
    output:
        table="probing/multi_token/results.csv",
    log:
        "logs/probing_multi_token/results.log",
    benchmark:
        "benchmarks/probing_multi_token/results.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        acts_args=probing_acts_list,
        sae_args=probing_multi_sae_args,
        site=MULTI_SITE,
        layer=probing_layer(MULTI_SITE) if MULTI_SITE else 0,
        k=MULTI_TOKEN.get("k", 128),
        epochs=MULTI_TOKEN.get("epochs", 1000),
        lr=MULTI_TOKEN.get("lr", 1e-4),
        seed=PROBING.get("seed", 42),
        code=code_version(
            "probing.multi_token", "probing.attention", "probing.probe", "probing.engine"
        ),
    shell:
        "python -m saeflow.probing.multi_token probe {params.acts_args} --site {params.site}"
        " --layer {params.layer} {params.sae_args} --k {params.k} --epochs {params.epochs}"
        " --lr {params.lr} --seed {params.seed} --threads {threads} --out {output.table}"
        " > {log} 2>&1"


rule probing_multi_token_figure:
    input:
        results="probing/multi_token/results.csv",
    output:
        table="plots/probing/multi_token.csv",
        pdf=report(
            "plots/probing/multi_token.pdf",
            caption="../report/probing_multi_token.rst",
            category="Sparse probing",
        ),
    log:
        "logs/probing_multi_token_figure/figure.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        code=code_version("probing.multi_token"),
    shell:
        "python -m saeflow.probing.multi_token figure --results {input.results}"
        " --table {output.table} --pdf {output.pdf} > {log} 2>&1"
