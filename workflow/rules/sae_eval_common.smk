# Helpers of sae_eval.smk: the named functions its rules call.
# Kept out of that file so that it holds rules only (snakemake --lint); included from the
# Snakefile just before sae_eval.smk.


def sae_model_path(wildcards):
    return model_path(SAES[wildcards.sae_id]["model"])


def all_metrics(wildcards):
    return [f"sae_eval/{sae_id}/{EVAL_CORPUS}.metrics.json" for sae_id in sorted(SAES)]


def csr_max_l0_flag(wildcards):
    """--csr-max-l0 unless evaluation.csr_max_l0 is null (then every file keeps its CSR)."""
    limit = config["evaluation"]["csr_max_l0"]
    return "" if limit is None else f"--csr-max-l0 {limit}"


def error_sae_cfgs(wildcards):
    """Figure 8's error SAEs (autointerp.smk's AI_SAES): rows of the table from their training."""
    return [f"saes/{sae_id}/cfg.json" for sae_id in AI_SAES]
