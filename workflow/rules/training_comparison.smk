# Training-technique comparison: FVU, CE-loss score, L0 and dead fraction against training
# tokens and wall time for the families of config training_comparison (saeflow.training_comparison).


rule training_comparison:
    input:
        unpack(training_comparison_inputs),
    output:
        table="tables/training_comparison.csv",
    log:
        "logs/training_comparison/training_comparison.log",
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        saes=training_comparison_args,
        code=code_version("training_comparison"),
    shell:
        "python -m saeflow.training_comparison table {params.saes} --metrics {input.metrics}"
        " --log-dir logs/train_sae --bench-dir benchmarks/train_sae --out {output.table}"
        " > {log} 2>&1"


rule plot_training_comparison:
    input:
        table="tables/training_comparison.csv",
    output:
        pdf=report(
            "plots/training_comparison.pdf",
            caption="../report/training_comparison.rst",
            category="Training techniques",
            labels={"figure": "training comparison"},
        ),
        csv="plots/training_comparison.csv",
    log:
        "logs/plot_training_comparison/training_comparison.log",
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        width=TRAINING_COMPARISON.get("figure", {}).get("width", 9.0),
        height=TRAINING_COMPARISON.get("figure", {}).get("height", 5.0),
        code=code_version("training_comparison"),
    shell:
        "python -m saeflow.training_comparison plot --table {input.table} --out {output.pdf}"
        " --width {params.width} --height {params.height} > {log} 2>&1"
