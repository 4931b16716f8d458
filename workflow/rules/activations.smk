# Model activations: one job per (model, corpus) caches every site of that model in one forward
# pass that stops after the last layer needed; the full model's per-token loss is its own job.


for _model in config["models"]:

    rule:
        name:
            f"cache_activations_{_model}"
        input:
            model=model_input,
            tokens="data/tokens/{corpus}.h5",
        output:
            expand(
                "acts/{{model}}/{{corpus}}/{site}.h5",
                site=sites_to_cache(config, _model),
            ),
        log:
            "logs/cache_activations/{model}/{corpus}.log",
        benchmark:
            "benchmarks/cache_activations/{model}/{corpus}.tsv"
        wildcard_constraints:
            model=re.escape(_model),
        conda:
            "../../envs/saeflow.yaml"
        threads: THREADS
        resources:
            mem_mb=model_mem_mb,
            runtime=120,
            gpu=1,
        params:
            model=model_path_param,
            sites=site_args,
            dtype=config["models"][_model]["dtype"],
            batch_size=config["activations"]["batch_size"],
            skip=config["activations"]["skip_positions"],
            chunk=config["activations"]["chunk_tokens"],
            code=code_version("activations"),
        shell:
            "python -m saeflow.activations cache --model {params.model} --tokens {input.tokens}"
            " {params.sites} --batch-size {params.batch_size} --dtype {params.dtype}"
            " --skip-positions {params.skip} --chunk-tokens {params.chunk}"
            " --model-name {wildcards.model} --corpus {wildcards.corpus} --threads {threads}"
            " --device auto > {log} 2>&1"


rule lm_loss:
    input:
        model=model_input,
        tokens="data/tokens/{corpus}.h5",
    output:
        loss="acts/{model}/{corpus}/lm_loss.h5",
    log:
        "logs/lm_loss/{model}/{corpus}.log",
    benchmark:
        "benchmarks/lm_loss/{model}/{corpus}.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=1,
    params:
        model=model_path_param,
        batch_size=config["activations"]["batch_size"],
        dtype=model_dtype,
        code=code_version("activations", "metrics"),
    shell:
        "python -m saeflow.activations loss --model {params.model} --tokens {input.tokens}"
        " --out {output.loss} --batch-size {params.batch_size} --dtype {params.dtype}"
        " --model-name {wildcards.model} --corpus {wildcards.corpus} --threads {threads}"
        " --device auto > {log} 2>&1"
