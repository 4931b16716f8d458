# Helpers of autointerp.smk: the configuration it reads and the named functions its rules call.
# Kept out of that file so that it holds rules only (snakemake --lint); included from the
# Snakefile just before autointerp.smk.

from snakemake.exceptions import WorkflowError

AI = config["autointerp"]
AI_BASE = AI["base_sae"]
AI_COMPONENTS = ["linear", "nonlinear"]


def _autointerp_settings():
    """Where the base SAE lives and which corpora the stages read; config errors name the key."""
    if AI_BASE is None:
        return {}
    if AI_BASE not in SAES:
        raise WorkflowError(
            f"autointerp.base_sae: '{AI_BASE}' is not an SAE of this config "
            f"(SAEs: {', '.join(sorted(SAES))})"
        )
    base = SAES[AI_BASE]
    train = AI["train_corpus"] or base.get("corpus")
    if train is None:
        raise WorkflowError(
            f"autointerp.train_corpus: base SAE '{AI_BASE}' is pretrained; "
            "name the corpus its error SAEs train on"
        )
    for key, corpus in [("train_corpus", train), ("corpus", AI["corpus"] or EVAL_CORPUS)]:
        if corpus not in config["corpora"]:
            raise WorkflowError(f"autointerp.{key}: '{corpus}' is not declared under 'corpora'")
    server = AI["server"]
    if server["kind"] == "remote" and not (server["base_url"] and server["model"]):
        raise WorkflowError("autointerp.server: kind 'remote' needs base_url and model")
    return {
        "model": base["model"],
        "site": base["site"],
        "train_corpus": train,
        "corpus": AI["corpus"] or EVAL_CORPUS,
    }


AI_SET = _autointerp_settings()
AI_SAES = [f"{AI_BASE}-{c}_error" for c in AI_COMPONENTS] if AI_BASE else []


def autointerp_acts(corpus):
    return f"acts/{AI_SET['model']}/{corpus}/{AI_SET['site']}.h5"


def autointerp_tokenizer(wildcards):
    """Where score_latents reads the tokenizer: the base SAE's model (an input function, so that
    snakemake --lint does not take the packaged model's folder for a hardcoded path prefix)."""
    return model_path(AI_SET["model"]) if AI_BASE else ""


def server_args(wildcards):
    """How score_latents reaches its LLM: a local transformers serve, or a remote endpoint."""
    server = AI["server"]
    if server["kind"] == "local":
        return f"--server local --model-dir {model_path(AI_SET['model'])}"
    key = f" --api-key-env {server['api_key_env']}" if server["api_key_env"] else ""
    return f"--server remote --base-url {server['base_url']} --model {server['model']}{key}"


def figure8_results(wildcards):
    """Both dictionaries' results, in AI_COMPONENTS order (the --labels order)."""
    if not AI_BASE:
        raise WorkflowError("tables/figure8.csv needs autointerp.base_sae in the config")
    return [f"autointerp/{sae_id}/results.jsonl" for sae_id in AI_SAES]


def figure8_options(wildcards):
    """Plot options of figures.figure8 as flags (a change redraws only the plot)."""
    options = config["figures"].get("figure8", {})
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in sorted(options.items()))
