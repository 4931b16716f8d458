# Model assets: the packaged SmolLM2-135M-Instruct GGUF converted once to a local HF folder.


rule convert_model:
    output:
        config="resources/models/{model}/config.json",
    wildcard_constraints:
        model=alternation(PACKAGED),
    params:
        code=code_version("models"),
    log:
        "logs/convert_model/{model}.log",
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "python -m saeflow.models convert --out resources/models/{wildcards.model} > {log} 2>&1"
