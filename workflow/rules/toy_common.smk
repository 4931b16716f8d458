# Helpers of toy.smk (named functions only; snakemake --lint wants them apart from rules).

TOY = config.get("toy") or {}
TOY_DATASETS = sorted(TOY.get("datasets", {}))
TOY_SAES = sorted(TOY.get("saes", {}))


def toy_generate_args(wildcards):
    """The generator's knobs of one toy data set as flags (a change reruns exactly it)."""
    spec = TOY["datasets"][wildcards.toy]
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in sorted(spec.items()))


def toy_train_args(wildcards):
    """Every training knob of one toy SAE as flags of saeflow.train."""
    spec = TOY["saes"][wildcards.variant]
    return " ".join(
        f"--{key.replace('_', '-')} {value}"
        for key, value in sorted(spec.items())
        if value is not None
    )


def toy_sae_folders():
    return [f"toy/{t}/saes/{s}" for t in TOY_DATASETS for s in TOY_SAES]


def toy_recovery_inputs(wildcards):
    return {
        "dictionaries": [f"toy/{t}/dictionary.h5" for t in TOY_DATASETS],
        "cfgs": [f"{folder}/cfg.json" for folder in toy_sae_folders()],
    }


def toy_sae_pairs(wildcards):
    return " ".join(f"{folder.rsplit('/', 1)[1]}={folder}" for folder in toy_sae_folders())


def toy_targets():
    """What the default target builds of this stage (nothing without toy data sets)."""
    if not TOY_DATASETS or not TOY_SAES:
        return []
    return ["tables/toy_recovery.csv", "plots/toy_recovery.pdf"]
