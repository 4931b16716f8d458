# saeflow: wiring only. Stages live in workflow/rules/*.smk; code in src/saeflow/.
from snakemake.utils import min_version, validate

min_version("9.0")


# config/config.yaml unless --configfile names another complete config (config/test.yaml, config/paper/*).
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/activations_common.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/saes_common.smk"
include: "workflow/rules/saes.smk"
include: "workflow/rules/sae_eval_common.smk"
include: "workflow/rules/sae_eval.smk"
include: "workflow/rules/dark_matter_common.smk"
include: "workflow/rules/dark_matter.smk"
include: "workflow/rules/downstream_ce.smk"
include: "workflow/rules/noise_simulation.smk"
include: "workflow/rules/cross_site.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/autointerp_common.smk"
include: "workflow/rules/autointerp.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/training_comparison_common.smk"
include: "workflow/rules/training_comparison.smk"
include: "workflow/rules/mlsae_common.smk"
include: "workflow/rules/mlsae.smk"
include: "workflow/rules/analysis_common.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/probing_common.smk"
include: "workflow/rules/probing.smk"


rule all:
    default_target: True
    input:
        all_targets(),
