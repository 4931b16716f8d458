# Helpers shared by the rule files, as named functions only (no lambdas in rules).
import hashlib
import importlib.util
import os
import re

from snakemake.exceptions import WorkflowError

from saeflow.config import check, check_config_files, sae_table, sites_to_cache

# Paths in the config are relative to the repository root; the workflow runs inside results/.
REPO = os.path.abspath(workflow.basedir)
check_config_files(workflow.configfiles)  # Snakemake's loader lets a repeated key win
check(config)
SAES = sae_table(config)
TRAINED = sorted(i for i, s in SAES.items() if s["kind"] == "trained")
PRETRAINED = sorted(i for i, s in SAES.items() if s["kind"] == "pretrained")
PACKAGED = sorted(m for m, spec in config["models"].items() if spec["path"] == "packaged")
EVAL_CORPUS = config["evaluation"]["corpus"]
THREADS = config["threads"]  # what each heavy job claims (schema: threads)


workdir: os.path.join(REPO, config["workdir"])


def code_version(*modules):
    """Content hash of the saeflow modules a rule runs, given to the rule as ``params.code``.

    Snakemake reruns a job when its params change, so editing one of these modules reruns
    exactly the jobs of the rules that list it; touching a file, moving the checkout or
    reinstalling the package changes nothing. Each rule lists its stage module and the library
    modules that hold its math; shared helpers (h5io, models) are left out on purpose.
    """
    digest = hashlib.sha256()
    for module in modules:
        spec = importlib.util.find_spec(f"saeflow.{module}")
        if spec is None or spec.origin is None:
            raise WorkflowError(f"code_version: no module saeflow.{module}")
        with open(spec.origin, "rb") as f:
            digest.update(module.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def alternation(names):
    """A wildcard constraint matching exactly these names (or nothing)."""
    return "|".join(map(re.escape, names)) or "(?!)"


def model_path(model):
    """Where a model's weights are read from: its converted folder, a local folder, or a hub id."""
    path = config["models"][model]["path"]
    if path == "packaged":
        return f"resources/models/{model}"
    local = os.path.join(REPO, path)
    return local if os.path.exists(local) else path


def model_files(model):
    """Files a job needs so that the model exists: the converted folder's config, if packaged."""
    return [f"resources/models/{model}/config.json"] if model in PACKAGED else []


def model_input(wildcards):
    return model_files(wildcards.model)


def corpus_args(wildcards):
    """Command-line arguments describing a corpus (every knob, so a change reruns the job)."""
    c = config["corpora"][wildcards.corpus]
    args = [
        f"--source {c['source']}",
        f"--tokenizer {model_path(c['tokenizer'])}",
        f"--ctx-len {c['ctx_len']} --n-seq {c['n_seq']} --seed {c['seed']}",
        "--prepend-bos" if c["prepend_bos"] else "--no-prepend-bos",
        f"--split {c['split']} --eval-fraction {c['eval_fraction']}",
    ]
    if c["source"] == "hf":
        hf = c["hf"]
        args.append(f"--hf-path {hf['path']} --hf-split {hf.get('split', 'train')}")
        args.append(f"--hf-text-field {hf.get('text_field', 'text')}")
        if hf.get("name"):
            args.append(f"--hf-name {hf['name']}")
    return " ".join(args)


def corpus_model_input(wildcards):
    return model_files(config["corpora"][wildcards.corpus]["tokenizer"])


def sae_model_input(wildcards):
    return model_files(SAES[wildcards.sae_id]["model"])


def sae_train_acts(wildcards):
    sae = SAES[wildcards.sae_id]
    return f"acts/{sae['model']}/{sae['corpus']}/{sae['site']}.h5"


def sae_eval_acts(wildcards):
    sae = SAES[wildcards.sae_id]
    return f"acts/{sae['model']}/{wildcards.corpus}/{sae['site']}.h5"


def all_targets():
    """Everything the default target builds."""
    targets = [f"sae_eval/{sae_id}/{EVAL_CORPUS}.metrics.json" for sae_id in SAES]
    targets.append("tables/sae_metrics.csv")
    if config["activations"]["lm_loss"]:
        targets += [f"acts/{model}/{EVAL_CORPUS}/lm_loss.h5" for model in config["models"]]
    if config["dark_matter"]["family"]:
        targets += [f"plots/figure{n}.pdf" for n in DM_FIGURES]
        targets += [f"plots/figure{n}.pdf" for n in EFFECT_FIGURES]
        targets += EFFECT_TABLES
    if config.get("autointerp", {}).get("base_sae"):
        targets.append("plots/figure8.pdf")
    targets += toy_targets()  # toy.smk, included after this file: called only by rule all
    targets += training_comparison_targets()  # workflow/rules/training_comparison_common.smk
    targets += mlsae_targets()  # workflow/rules/mlsae.smk
    targets += analysis_targets()  # workflow/rules/analysis.smk
    targets += probing_targets()  # workflow/rules/probing.smk
    return targets


def model_mem_mb(wildcards):
    """Memory request of a job that loads the model named by its {model} wildcard."""
    return config["models"][wildcards.model]["mem_mb"]  # default (8000) set by the schema


def sae_model_mem_mb(wildcards):
    """Memory request of a job that loads the model of its {sae_id}'s SAE."""
    return config["models"][SAES[wildcards.sae_id]["model"]]["mem_mb"]


def model_dtype(wildcards):
    return config["models"][wildcards.model]["dtype"]


def sae_site(wildcards):
    return SAES[wildcards.sae_id]["site"]


def sae_model(wildcards):
    return SAES[wildcards.sae_id]["model"]
