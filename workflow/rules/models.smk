# Model assets: the packaged SmolLM2-135M-Instruct GGUF converted once to a local HF folder.


rule convert_model:
    output:
        config="resources/models/{model}/config.json",
    log:
        "logs/convert_model/{model}.log",
    wildcard_constraints:
        model=alternation(PACKAGED),
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        code=code_version("models"),
    shell:
        "python -m saeflow.models convert --out resources/models/{wildcards.model} > {log} 2>&1"
