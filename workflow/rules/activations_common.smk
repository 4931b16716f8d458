# Helpers of activations.smk: the named functions its rules call.
# Kept out of that file so that it holds rules only (snakemake --lint); included from the
# Snakefile just before activations.smk.


def site_args(wildcards, output):
    """--site/--out pairs, in the order of the rule's outputs."""
    sites = sites_to_cache(config, wildcards.model)
    return " ".join(f"--site {s} --out {o}" for s, o in zip(sites, output))


def model_path_param(wildcards):
    return model_path(wildcards.model)
