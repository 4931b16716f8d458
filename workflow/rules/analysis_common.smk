# Helpers of analysis.smk: the configuration it reads and the named functions its rules call.
# Kept out of that file so that it holds rules only (snakemake --lint); included from the
# Snakefile just before analysis.smk.

from snakemake.exceptions import WorkflowError

AN = config["analysis"]
AN_SAES = AN["saes"]
for _sae in AN_SAES:
    if _sae not in SAES:
        raise WorkflowError(
            f"analysis.saes: '{_sae}' is not an SAE of this config "
            f"(SAEs: {', '.join(sorted(SAES))})"
        )


def analysis_options(wildcards):
    """The analyzer's knobs as flags."""
    keys = (
        "n_top",
        "n_bins",
        "n_per_bin",
        "n_nonact",
        "n_hist",
        "n_logits",
        "n_neighbours",
        "before",
        "after",
        "chunk_tokens",
        "seed",
    )
    return " ".join(f"--{key.replace('_', '-')} {AN[key]}" for key in keys)


def analysis_autointerp(wildcards):
    """The SAE's auto-interp results (Figure 8's stages), where the DAG makes them."""
    ai_saes = globals().get("AI_SAES", [])
    return [f"autointerp/{wildcards.sae_id}/results.jsonl"] if wildcards.sae_id in ai_saes else []


def analysis_autointerp_flag(wildcards):
    found = analysis_autointerp(wildcards)
    return f"--autointerp {found[0]}" if found else ""


def analysis_acts(wildcards):
    """The activations file (tokens, sequence layout) the SAE was evaluated on."""
    sae = SAES[wildcards.sae_id]
    return f"acts/{sae['model']}/{EVAL_CORPUS}/{sae['site']}.h5"


def analysis_targets():
    """The loads and dashboards of every analysed SAE (for all_targets)."""
    return [f"analysis/{s}/loaded.json" for s in AN_SAES] + [
        f"plots/dashboards/{s}/index.html" for s in AN_SAES
    ]
