# Figure 8 of "Decomposing the Dark Matter of SAEs": TopK SAEs trained on the linear and the
# nonlinear component of a base SAE's error, their latents explained and scored by an LLM, and the
# detection-by-decile plot. Chain per component C (linear, nonlinear), with E = {base}-{C}_error:
#   error_saes/{base}/{train corpus}/fit.h5      fit_error_map   (SaeError ~ x @ W + b)
#   saes/E/                                      train_error_sae (targets computed per batch)
#   autointerp/E/examples.h5                     latent_examples (on the examples corpus)
#   autointerp/E/results.jsonl, summary.json     score_latents   (LLM; cache beside, not an output)
#   tables/figure8.csv -> plots/figure8.pdf      figure8_table, plot_figure8


rule fit_error_map:
    input:
        acts=autointerp_acts("{corpus}") if AI_BASE else [],
        sae="saes/{base_sae}/cfg.json",
        weights="saes/{base_sae}/sae_weights.safetensors",
    output:
        fit="error_saes/{base_sae}/{corpus}/fit.h5",
    log:
        "logs/fit_error_map/{base_sae}/{corpus}.log",
    benchmark:
        "benchmarks/fit_error_map/{base_sae}/{corpus}.tsv"
    wildcard_constraints:
        base_sae=alternation([AI_BASE] if AI_BASE else []),
        corpus=alternation(sorted(config["corpora"])),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        chunk=AI["chunk_tokens"],
        code=code_version("error_saes", "dark_matter.regression"),
    shell:
        "python -m saeflow.error_saes fit --acts {input.acts} --base-sae saes/{wildcards.base_sae}"
        " --out {output.fit} --chunk-tokens {params.chunk} --threads {threads} > {log} 2>&1"


rule train_error_sae:
    input:
        acts=autointerp_acts(AI_SET["train_corpus"]) if AI_BASE else [],
        sae="saes/{base_sae}/cfg.json",
        weights="saes/{base_sae}/sae_weights.safetensors",
        fit=f"error_saes/{{base_sae}}/{AI_SET.get('train_corpus')}/fit.h5",
    output:
        cfg="saes/{base_sae}-{component}_error/cfg.json",
        weights="saes/{base_sae}-{component}_error/sae_weights.safetensors",
    log:
        "logs/train_error_sae/{base_sae}-{component}_error.log",
    benchmark:
        "benchmarks/train_error_sae/{base_sae}-{component}_error.tsv"
    wildcard_constraints:
        base_sae=alternation([AI_BASE] if AI_BASE else []),
        component=alternation(AI_COMPONENTS),
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    params:
        width=AI["width"],
        k=AI["k"],
        tokens=AI["tokens"],
        batch_size=AI["batch_size"],
        seed=AI["seed"],
        optional=" ".join(
            f"--{flag} {AI[key]}"
            for key, flag in [("lr", "lr"), ("lr_warmup_steps", "lr-warmup-steps")]
            if AI[key] is not None
        ),
        checkpoint_every=AI["checkpoint_every"],
        site=AI_SET.get("site"),
        model=AI_SET.get("model"),
        corpus=AI_SET.get("train_corpus"),
        code=code_version("error_saes", "topk", "batches"),
    shell:
        "python -m saeflow.error_saes train --acts {input.acts}"
        " --base-sae saes/{wildcards.base_sae} --base-sae-id {wildcards.base_sae}"
        " --fit {input.fit} --component {wildcards.component}"
        " --out saes/{wildcards.base_sae}-{wildcards.component}_error"
        " --checkpoint-dir checkpoints/{wildcards.base_sae}-{wildcards.component}_error"
        " --d-sae {params.width} --k {params.k} --tokens {params.tokens}"
        " --batch-size {params.batch_size} --seed {params.seed} {params.optional}"
        " --checkpoint-every {params.checkpoint_every} --hook-name {params.site}"
        " --model-name {params.model} --dataset {params.corpus} --threads {threads}"
        " --device auto > {log} 2>&1"


rule latent_examples:
    input:
        acts=autointerp_acts(AI_SET["corpus"]) if AI_BASE else [],
        tokens=f"data/tokens/{AI_SET.get('corpus')}.h5",
        sae="saes/{base_sae}-{component}_error/cfg.json",
        weights="saes/{base_sae}-{component}_error/sae_weights.safetensors",
        base="saes/{base_sae}/cfg.json",
        base_weights="saes/{base_sae}/sae_weights.safetensors",
        fit=f"error_saes/{{base_sae}}/{AI_SET.get('train_corpus')}/fit.h5",
    output:
        examples="autointerp/{base_sae}-{component}_error/examples.h5",
    log:
        "logs/latent_examples/{base_sae}-{component}_error.log",
    benchmark:
        "benchmarks/latent_examples/{base_sae}-{component}_error.tsv"
    wildcard_constraints:
        base_sae=alternation([AI_BASE] if AI_BASE else []),
        component=alternation(AI_COMPONENTS),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        counts=" ".join(
            f"--{key.replace('_', '-')} {AI[key]}"
            for key in (
                "n_latents",
                "ctx_len",
                "n_top",
                "n_per_decile",
                "n_random",
                "max_examples",
                "min_examples",
                "seed",
                "chunk_tokens",
            )
        ),
        code=code_version("autointerp.examples", "error_saes"),
    shell:
        "python -m saeflow.autointerp.examples --acts {input.acts} --tokens {input.tokens}"
        " --sae saes/{wildcards.base_sae}-{wildcards.component}_error"
        " --sae-id {wildcards.base_sae}-{wildcards.component}_error"
        " --base-sae saes/{wildcards.base_sae} --fit {input.fit}"
        " --component {wildcards.component} --out {output.examples} {params.counts}"
        " --threads {threads} > {log} 2>&1"


rule score_latents:
    input:
        examples="autointerp/{sae_id}/examples.h5",
        model=model_files(AI_SET["model"]) if AI_BASE else [],
    output:
        results="autointerp/{sae_id}/results.jsonl",
        summary="autointerp/{sae_id}/summary.json",
    log:
        "logs/score_latents/{sae_id}.log",
    benchmark:
        "benchmarks/score_latents/{sae_id}.tsv"
    wildcard_constraints:
        sae_id=alternation(AI_SAES),
    # A local server uses the job's threads; llm_server=1 lets a profile or --resources run one
    # server at a time (two 135M-parameter servers on 2 cores only slow each other down).
    conda:
        "../../envs/saeflow.yaml"
    threads: AI["server"]["threads"] if AI["server"]["kind"] == "local" else 1
    resources:
        mem_mb=6000,
        runtime=120,
        llm_server=1 if AI["server"]["kind"] == "local" else 0,
    params:
        tokenizer=autointerp_tokenizer,
        server=server_args,
        concurrency=AI["score"]["concurrency"],
        timeout=AI["score"]["timeout"],
        max_retries=AI["score"]["max_retries"],
        n_explain=AI["n_top"],
        per_prompt=AI["score"]["examples_per_prompt"],
        method=AI["score"]["method"],
        max_failed=AI["score"]["max_failed_fraction"],
        seed=AI["seed"],
        code=code_version(
            "autointerp.score",
            "autointerp.client",
            "autointerp.prompts",
            "autointerp.scoring",
            "autointerp.server",
            "autointerp.judge",
        ),
    shell:
        # the answer cache sits beside the outputs and is not one, so a failed job keeps it
        "python -m saeflow.autointerp.score --examples {input.examples}"
        " --tokenizer {params.tokenizer} --out {output.results} --summary {output.summary}"
        " --cache autointerp/{wildcards.sae_id}/llm_cache.jsonl {params.server}"
        " --server-log {log}.server --server-threads {threads} --concurrency {params.concurrency}"
        " --timeout {params.timeout} --max-retries {params.max_retries}"
        " --n-explain {params.n_explain} --examples-per-prompt {params.per_prompt}"
        " --method {params.method} --max-failed-fraction {params.max_failed} --seed {params.seed} > {log} 2>&1"


rule figure8_table:
    input:
        results=figure8_results,
    output:
        table="tables/figure8.csv",
    log:
        "logs/figure8_table/figure8.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        labels=AI_COMPONENTS,
        code=code_version("figures.figure8", "autointerp.scoring"),
    shell:
        "python -m saeflow.figures.figure8 table --results {input.results}"
        " --labels {params.labels} --out {output.table} > {log} 2>&1"


rule plot_figure8:
    input:
        table="tables/figure8.csv",
    output:
        pdf=report(
            "plots/figure8.pdf",
            caption="../report/figure8.rst",
            category="Dark Matter",
            labels={"figure": "8"},
        ),
    log:
        "logs/plot_figure8/figure8.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        options=figure8_options,
        code=code_version("figures.figure8", "figures.pdf"),
    shell:
        "python -m saeflow.figures.figure8 plot --table {input.table} --out {output.pdf}"
        " {params.options} > {log} 2>&1"
