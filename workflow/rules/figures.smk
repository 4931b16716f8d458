# Figures: each plots/figureN.pdf is drawn only from tables/figureN.csv; plotting options come
# from config["figures"]["figureN"], so changing one redraws only that plot.
# Its helper function plot_options is in dark_matter_common.smk.


rule plot_dark_matter:
    input:
        table="tables/figure{figure}.csv",
    output:
        pdf=report(
            "plots/figure{figure}.pdf",
            caption="../report/dark_matter_figure.rst",
            category="Dark Matter",
            labels={"figure": "{figure}"},
        ),
    log:
        "logs/plot_dark_matter/figure{figure}.log",
    wildcard_constraints:
        figure=alternation(DM_FIGURES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        options=plot_options,
        code=code_version("figures.dark_matter", "figures.pdf"),
    shell:
        "python -m saeflow.figures.dark_matter --figure {wildcards.figure}"
        " --table {input.table} --out {output.pdf} {params.options} > {log} 2>&1"


# Figures 9, 10b and 15 (Dark Matter paper): drawn by saeflow.figures.error_effects, each only
# from its tables/figureN.csv; options from config["figures"]["figureN"] via plot_options.
EFFECT_FIGURES = ["9", "10b", "15"]
# tables the default target builds with no plot of their own
EFFECT_TABLES = ["tables/table1.csv"]


rule plot_error_effects:
    input:
        table="tables/figure{figure}.csv",
    output:
        pdf=report(
            "plots/figure{figure}.pdf",
            caption="../report/dark_matter_figure.rst",
            category="Dark Matter",
            labels={"figure": "{figure}"},
        ),
    log:
        "logs/plot_error_effects/figure{figure}.log",
    wildcard_constraints:
        figure=alternation(EFFECT_FIGURES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        options=plot_options,
        code=code_version("figures.error_effects", "figures.pdf"),
    shell:
        "python -m saeflow.figures.error_effects --figure {wildcards.figure}"
        " --table {input.table} --out {output.pdf} {params.options} > {log} 2>&1"
