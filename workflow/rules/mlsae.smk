# Multi-layer SAEs (saeflow.mlsae): every layer's residual stream of the MLSAE corpora cached by
# saeflow.activations (under mlsae/acts/, so the spine's caches keep their sites), one training
# and one evaluation job per MLSAE of the expansion factor x k sweep, and the tables. Single-layer
# baselines (mlsae.baseline_layers) are trained by the same rule on one layer's cache.


rule cache_mlsae_activations:
    input:
        model=mlsae_model_files,
        tokens="data/tokens/{corpus}.h5",
    output:
        expand(
            "mlsae/acts/{model}/{{corpus}}/{site}.h5",
            model=MLSAE.get("model", "none"),
            site=MLSAE_SITES,
        ),
    log:
        "logs/cache_mlsae_activations/{corpus}.log",
    benchmark:
        "benchmarks/cache_mlsae_activations/{corpus}.tsv"
    wildcard_constraints:
        corpus=alternation([MLSAE["corpus"], MLSAE["eval_corpus"]] if MLSAES else []),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=mlsae_model_mem_mb,
        runtime=120,
        gpu=1,
    params:
        model=mlsae_model_path,
        sites=mlsae_cache_args,
        dtype=config["models"][MLSAE["model"]]["dtype"] if MLSAES else "float32",
        batch_size=config["activations"]["batch_size"],
        skip=config["activations"]["skip_positions"],
        chunk=config["activations"]["chunk_tokens"],
        model_name=MLSAE.get("model"),
        code=code_version("activations"),
    shell:
        "python -m saeflow.activations cache --model {params.model} --tokens {input.tokens}"
        " {params.sites} --batch-size {params.batch_size} --dtype {params.dtype}"
        " --skip-positions {params.skip} --chunk-tokens {params.chunk}"
        " --model-name {params.model_name} --corpus {wildcards.corpus} --threads {threads}"
        " --device auto > {log} 2>&1"


rule train_mlsae:
    input:
        unpack(mlsae_train_inputs),
    output:
        cfg="mlsae/saes/{mlsae_id}/cfg.json",
        weights="mlsae/saes/{mlsae_id}/sae_weights.safetensors",
        original="mlsae/saes/{mlsae_id}/original/model.safetensors",
    log:
        "logs/train_mlsae/{mlsae_id}.log",
    benchmark:
        "benchmarks/train_mlsae/{mlsae_id}.tsv"
    wildcard_constraints:
        mlsae_id=alternation(MLSAE_TRAINED + MLSAE_BASELINE_IDS),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        source=mlsae_train_source,
        args=mlsae_train_args,
        layers=mlsae_layer_args,
        model=MLSAE.get("model"),
        corpus=MLSAE.get("corpus"),
        code=code_version(
            "mlsae.train", "mlsae.trainer", "mlsae.math", "mlsae.stream", "batches", "topk"
        ),
    shell:
        "python -m saeflow.mlsae.train {params.source} --layers {params.layers}"
        " --out mlsae/saes/{wildcards.mlsae_id}"
        " --checkpoint-dir checkpoints/mlsae/{wildcards.mlsae_id} {params.args}"
        " --model-name {params.model} --dataset {params.corpus} --threads {threads}"
        " --device auto > {log} 2>&1"


rule import_mlsae:
    output:
        cfg="mlsae/saes/{mlsae_id}/cfg.json",
        weights="mlsae/saes/{mlsae_id}/sae_weights.safetensors",
        original="mlsae/saes/{mlsae_id}/original/model.safetensors",
    log:
        "logs/import_mlsae/{mlsae_id}.log",
    wildcard_constraints:
        mlsae_id=alternation(MLSAE_PRETRAINED),
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        args=mlsae_import_args,
        code=code_version("mlsae.pretrained", "mlsae.trainer"),
    shell:
        "python -m saeflow.mlsae.pretrained {params.args} --out mlsae/saes/{wildcards.mlsae_id}"
        " > {log} 2>&1"


rule evaluate_mlsae:
    input:
        cfg="mlsae/saes/{mlsae_id}/cfg.json",
        weights="mlsae/saes/{mlsae_id}/sae_weights.safetensors",
        acts=mlsae_eval_acts,
        tokens=f"data/tokens/{MLSAE.get('eval_corpus')}.h5",
        model=mlsae_model_files,
    output:
        layers="mlsae/eval/{mlsae_id}/layers.csv",
        summary="mlsae/eval/{mlsae_id}/summary.json",
        dists="mlsae/eval/{mlsae_id}/dists.safetensors",
        variances="mlsae/eval/{mlsae_id}/variances.csv",
    log:
        "logs/evaluate_mlsae/{mlsae_id}.log",
    benchmark:
        "benchmarks/evaluate_mlsae/{mlsae_id}.tsv"
    wildcard_constraints:
        mlsae_id=alternation(sorted(MLSAES)),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=mlsae_model_mem_mb,
        runtime=60,
        gpu=1,
    params:
        model=mlsae_model_path,
        layers=mlsae_layer_args,
        downstream_seqs=MLSAE.get("downstream_seqs"),
        batch_size=MLSAE.get("batch_size_eval"),
        chunk=MLSAE.get("chunk_tokens"),
        skip=config["activations"]["skip_positions"],
        code=code_version("mlsae.evaluate", "mlsae.math", "mlsae.trainer", "metrics"),
    shell:
        "python -m saeflow.mlsae.evaluate run --sae mlsae/saes/{wildcards.mlsae_id}"
        " --acts {input.acts} --layers {params.layers} --model {params.model}"
        " --tokens {input.tokens} --sae-id {wildcards.mlsae_id}"
        " --downstream-seqs {params.downstream_seqs} --batch-size {params.batch_size}"
        " --skip-positions {params.skip} --chunk-tokens {params.chunk}"
        " --layer-csv {output.layers} --summary {output.summary} --dists {output.dists}"
        " --variances {output.variances} --threads {threads} --device auto > {log} 2>&1"


rule evaluate_mlsae_baseline:
    input:
        cfg="mlsae/saes/{mlsae_id}/cfg.json",
        weights="mlsae/saes/{mlsae_id}/sae_weights.safetensors",
        acts=mlsae_eval_acts,
        tokens=f"data/tokens/{MLSAE.get('eval_corpus')}.h5",
        model=mlsae_model_files,
    output:
        layers="mlsae/eval/{mlsae_id}/layers.csv",
        summary="mlsae/eval/{mlsae_id}/summary.json",
    log:
        "logs/evaluate_mlsae_baseline/{mlsae_id}.log",
    benchmark:
        "benchmarks/evaluate_mlsae_baseline/{mlsae_id}.tsv"
    wildcard_constraints:
        mlsae_id=alternation(MLSAE_BASELINE_IDS),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=mlsae_model_mem_mb,
        runtime=60,
        gpu=1,
    params:
        model=mlsae_model_path,
        layers=mlsae_layer_args,
        downstream_seqs=MLSAE.get("downstream_seqs"),
        batch_size=MLSAE.get("batch_size_eval"),
        chunk=MLSAE.get("chunk_tokens"),
        skip=config["activations"]["skip_positions"],
        code=code_version("mlsae.evaluate", "mlsae.math", "mlsae.trainer", "metrics"),
    shell:
        "python -m saeflow.mlsae.evaluate run --sae mlsae/saes/{wildcards.mlsae_id}"
        " --acts {input.acts} --layers {params.layers} --model {params.model}"
        " --tokens {input.tokens} --sae-id {wildcards.mlsae_id}"
        " --downstream-seqs {params.downstream_seqs} --batch-size {params.batch_size}"
        " --skip-positions {params.skip} --chunk-tokens {params.chunk}"
        " --layer-csv {output.layers} --summary {output.summary}"
        " --threads {threads} --device auto > {log} 2>&1"


rule mlsae_vs_single_layer:
    input:
        mlsaes=mlsae_compared_files("layers.csv"),
        baselines=mlsae_baseline_files("layers.csv"),
    output:
        table="tables/mlsae_vs_single_layer.csv",
    log:
        "logs/mlsae_vs_single_layer/table.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        pairs=mlsae_baseline_pairs,
        code=code_version("mlsae.baselines"),
    shell:
        "python -m saeflow.mlsae.baselines --mlsae-layers {input.mlsaes}"
        " --baseline-layers {input.baselines} {params.pairs} --out {output.table} > {log} 2>&1"


rule mlsae_tables:
    input:
        summaries=mlsae_eval_files("summary.json"),
        layers=mlsae_eval_files("layers.csv"),
        variances=mlsae_eval_files("variances.csv"),
        dists=mlsae_eval_files("dists.safetensors"),
    output:
        table="tables/mlsae_metrics.csv",
        layers="tables/mlsae_layers.csv",
        variances="tables/mlsae_variances.csv",
        sweep="tables/mlsae_sweep.csv",
        layer_std="tables/mlsae_layer_std.csv",
    log:
        "logs/mlsae_tables/tables.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        ids=" ".join(sorted(MLSAES)),
        code=code_version("mlsae.evaluate", "mlsae.math"),
    shell:
        "python -m saeflow.mlsae.evaluate table --summaries {input.summaries}"
        " --layer-csvs {input.layers} --variances {input.variances} --out {output.table}"
        " --out-layers {output.layers} --out-variances {output.variances}"
        " --dists {input.dists} --sae-ids {params.ids} --out-sweep {output.sweep}"
        " --out-layer-std {output.layer_std} > {log} 2>&1"


rule plot_mlsae_dists:
    input:
        dists="mlsae/eval/{mlsae_id}/dists.safetensors",
        cfg="mlsae/saes/{mlsae_id}/cfg.json",
        weights="mlsae/saes/{mlsae_id}/sae_weights.safetensors",
    output:
        csv="plots/mlsae/dists_heatmap_{mlsae_id}.csv",
        pdf=report(
            "plots/mlsae/dists_heatmap_{mlsae_id}.pdf",
            caption="../report/mlsae_dists.rst",
            category="Multi-layer SAEs",
            labels={"figure": "layer distributions", "sae": "{mlsae_id}"},
        ),
        hist_csv="plots/mlsae/dists_histogram_{mlsae_id}.csv",
        hist_pdf=report(
            "plots/mlsae/dists_histogram_{mlsae_id}.pdf",
            caption="../report/mlsae_dists_histogram.rst",
            category="Multi-layer SAEs",
            labels={"figure": "mean-layer histogram", "sae": "{mlsae_id}"},
        ),
        cos_csv="plots/mlsae/dists_cos_sim_heatmap_{mlsae_id}.csv",
        cos_pdf=report(
            "plots/mlsae/dists_cos_sim_heatmap_{mlsae_id}.pdf",
            caption="../report/mlsae_dists_cos_sim.rst",
            category="Multi-layer SAEs",
            labels={"figure": "latent pairs: layer distance x cosine", "sae": "{mlsae_id}"},
        ),
    log:
        "logs/plot_mlsae_dists/{mlsae_id}.log",
    wildcard_constraints:
        mlsae_id=alternation(sorted(MLSAES)),
    conda:
        "../../envs/saeflow.yaml"
    params:
        code=code_version("figures.mlsae", "figures.pdf", "mlsae.math", "mlsae.similarity"),
    shell:
        "python -m saeflow.figures.mlsae dists --dists {input.dists}"
        " --sae-id {wildcards.mlsae_id} --csv {output.csv} --pdf {output.pdf}"
        " --hist-csv {output.hist_csv} --hist-pdf {output.hist_pdf}"
        " --sae mlsae/saes/{wildcards.mlsae_id} --cos-csv {output.cos_csv}"
        " --cos-pdf {output.cos_pdf} > {log} 2>&1"


rule plot_mlsae_fvu:
    input:
        layers="tables/mlsae_layers.csv",
    output:
        csv="plots/mlsae/fvu_layers.csv",
        pdf=report(
            "plots/mlsae/fvu_layers.pdf",
            caption="../report/mlsae_fvu.rst",
            category="Multi-layer SAEs",
            labels={"figure": "FVU and ΔCE per layer", "sae": "all"},
        ),
    log:
        "logs/plot_mlsae_fvu/fvu.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        code=code_version("figures.mlsae", "figures.pdf"),
    shell:
        "python -m saeflow.figures.mlsae fvu --layers {input.layers} --csv {output.csv}"
        " --pdf {output.pdf} > {log} 2>&1"


rule mlsae_similarities:
    input:
        cfgs=mlsae_sae_files("cfg.json"),
        weights=mlsae_sae_files("sae_weights.safetensors"),
        acts=expand(
            "mlsae/acts/{model}/{corpus}/{site}.h5",
            model=MLSAE.get("model", "none"),
            corpus=MLSAE.get("eval_corpus", "none"),
            site=MLSAE_SITES,
        ),
        model=mlsae_model_files,
    output:
        mmcs="tables/mlsae_mmcs.csv",
        resid="tables/mlsae_resid_cos_sim.csv",
        embed="tables/mlsae_embed_cos_sim.csv",
        embed_latents="mlsae/analysis/embed_cos_sim_latents.csv",
    log:
        "logs/mlsae_similarities/similarities.log",
    benchmark:
        "benchmarks/mlsae_similarities/similarities.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=mlsae_model_mem_mb,
        runtime=60,
    params:
        saes=mlsae_similarity_args,
        layers=" ".join(str(layer) for layer in MLSAE_LAYERS),
        model=mlsae_model_path,
        code=code_version("mlsae.similarity", "mlsae.trainer"),
    shell:
        "python -m saeflow.mlsae.similarity --saes {params.saes} --acts {input.acts}"
        " --layers {params.layers} --model {params.model} --mmcs {output.mmcs}"
        " --resid {output.resid} --embed {output.embed}"
        " --embed-latents {output.embed_latents} --threads {threads} > {log} 2>&1"


rule plot_mlsae_summary:
    input:
        mmcs="tables/mlsae_mmcs.csv",
        resid="tables/mlsae_resid_cos_sim.csv",
        embed_latents="mlsae/analysis/embed_cos_sim_latents.csv",
        layer_std="tables/mlsae_layer_std.csv",
        sweep="tables/mlsae_sweep.csv",
    output:
        csvs=expand("plots/mlsae/{name}.csv", name=MLSAE_SUMMARY_FIGURES),
        pdfs=[
            report(
                f"plots/mlsae/{name}.pdf",
                caption="../report/mlsae_summary.rst",
                category="Multi-layer SAEs",
                labels={"figure": name, "sae": "all"},
            )
            for name in MLSAE_SUMMARY_FIGURES
        ],
    log:
        "logs/plot_mlsae_summary/summary.log",
    conda:
        "../../envs/saeflow.yaml"
    params:
        code=code_version("figures.mlsae", "figures.pdf"),
    shell:
        "python -m saeflow.figures.mlsae summary --mmcs {input.mmcs} --resid {input.resid}"
        " --embed-latents {input.embed_latents} --layer-std {input.layer_std}"
        " --sweep {input.sweep} --out-dir plots/mlsae > {log} 2>&1"


rule mlsae_examples:
    input:
        cfg="mlsae/saes/{mlsae_id}/cfg.json",
        weights="mlsae/saes/{mlsae_id}/sae_weights.safetensors",
        acts=mlsae_eval_acts,
        model=mlsae_model_files,
    output:
        stamp="mlsae/analysis/{mlsae_id}/examples_loaded.json",
    log:
        "logs/mlsae_examples/{mlsae_id}.log",
    benchmark:
        "benchmarks/mlsae_examples/{mlsae_id}.tsv"
    wildcard_constraints:
        mlsae_id=alternation(MLSAE_EXAMPLES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        feature_db=1,
    params:
        model=mlsae_model_path,
        layers=mlsae_layer_args,
        n=MLSAE.get("examples_per_layer"),
        context=MLSAE.get("example_context"),
        chunk=MLSAE.get("chunk_tokens"),
        db=config["analysis"]["db"],
        code=code_version("mlsae.examples", "mlsae.math", "analysis.store"),
    shell:
        "python -m saeflow.mlsae.examples --sae mlsae/saes/{wildcards.mlsae_id}"
        " --sae-id {wildcards.mlsae_id} --acts {input.acts} --layers {params.layers}"
        " --model {params.model} --n-examples {params.n} --context {params.context}"
        " --chunk-tokens {params.chunk} --db {params.db} --stamp {output.stamp}"
        " --threads {threads} > {log} 2>&1"


rule plot_mlsae_prompt:
    input:
        cfgs=expand("mlsae/saes/{i}/cfg.json", i=sorted(MLSAES)),
        weights=expand("mlsae/saes/{i}/sae_weights.safetensors", i=sorted(MLSAES)),
        model=mlsae_model_files,
    output:
        csvs=expand("plots/mlsae/prompt_heatmap_{i}.csv", i=sorted(MLSAES)),
        pdfs=[
            report(
                f"plots/mlsae/prompt_heatmap_{i}.pdf",
                caption="../report/mlsae_prompt.rst",
                category="Multi-layer SAEs",
                labels={"figure": "prompt heatmap", "sae": i},
            )
            for i in sorted(MLSAES)
        ],
    log:
        "logs/plot_mlsae_prompt/prompt.log",
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=mlsae_model_mem_mb,
        runtime=20,
    params:
        saes=" ".join(f"{i}=mlsae/saes/{i}" for i in sorted(MLSAES)),
        model=mlsae_model_path,
        prompt=MLSAE.get("prompt", ""),
        code=code_version("figures.mlsae", "figures.pdf", "mlsae.prompt"),
    shell:
        "python -m saeflow.figures.mlsae prompt --saes {params.saes} --model {params.model}"
        " --prompt {params.prompt:q} --out-dir plots/mlsae > {log} 2>&1"
