# Helpers of training_comparison.smk (named functions only; snakemake --lint wants them apart).

TRAINING_COMPARISON = config.get("training_comparison") or {}
TC_FAMILIES = TRAINING_COMPARISON.get("families", [])
for _family in TC_FAMILIES:
    if _family not in config["sae_families"]:
        raise WorkflowError(
            f"training_comparison.families: {_family!r} is not an entry of sae_families "
            f"(expected one of {sorted(config['sae_families'])})"
        )
TC_SAES = [sae_id for sae_id in TRAINED if SAES[sae_id]["family"] in TC_FAMILIES]


def training_comparison_inputs(wildcards):
    return {
        "cfgs": [f"saes/{sae_id}/cfg.json" for sae_id in TC_SAES],
        "metrics": [f"sae_eval/{sae_id}/{EVAL_CORPUS}.metrics.json" for sae_id in TC_SAES],
    }


def training_comparison_args(wildcards):
    """The SAEs, their families and evaluation files, in the same order."""
    saes = " ".join(f"saes/{sae_id}" for sae_id in TC_SAES)
    families = " ".join(SAES[sae_id]["family"] for sae_id in TC_SAES)
    return f"--sae {saes} --family {families}"


def training_comparison_targets():
    """What the default target builds of this stage (nothing without families)."""
    if not TC_SAES:
        return []
    return ["tables/training_comparison.csv", "plots/training_comparison.pdf"]
