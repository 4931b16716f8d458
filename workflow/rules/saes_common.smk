# Helpers of saes.smk: the configuration it reads and the named functions its rules call.
# Kept out of that file so that it holds rules only (snakemake --lint); included from the
# Snakefile just before saes.smk.


# Keys of an SAE table entry that locate it in the DAG rather than configure its training.
NOT_TRAIN_ARGS = {"family", "kind", "model", "corpus", "site"}


def train_args(wildcards):
    """Every training knob of one SAE as command-line flags (a change reruns exactly it)."""
    sae = SAES[wildcards.sae_id]
    flags = [
        f"--{key.replace('_', '-')} {value}"
        for key, value in sorted(sae.items())
        if key not in NOT_TRAIN_ARGS and value is not None
    ]
    return " ".join(flags)


def import_args(wildcards):
    sae = SAES[wildcards.sae_id]
    if "path" in sae:
        return f"--path {os.path.join(REPO, sae['path'])}"
    return f"--release {sae['release']} --sae-id {sae['sae_id']}"
