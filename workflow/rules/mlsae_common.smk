# Helpers of mlsae.smk: the configuration it reads and the named functions its rules call.
# Kept out of that file so that it holds rules only (snakemake --lint); included from the
# Snakefile just before mlsae.smk.

from saeflow.mlsae import config as mlsae_config

MLSAES = mlsae_config.mlsae_table(config)
MLSAE = config.get("mlsae", {})
MLSAE_SITES = mlsae_config.sites(config) if MLSAES else []
MLSAE_LAYERS = mlsae_config.layers(config) if MLSAES else []
MLSAE_TRAINED = sorted(i for i, s in MLSAES.items() if s["kind"] == "trained")
MLSAE_PRETRAINED = sorted(i for i, s in MLSAES.items() if s["kind"] == "pretrained")


def mlsae_acts(corpus):
    return [f"mlsae/acts/{MLSAE['model']}/{corpus}/{s}.h5" for s in MLSAE_SITES]


def mlsae_cache_args(wildcards, output):
    return " ".join(f"--site {s} --out {o}" for s, o in zip(MLSAE_SITES, output))


def mlsae_model_files(wildcards):
    return model_files(MLSAE["model"])


def mlsae_model_path(wildcards):
    return model_path(MLSAE["model"])


def mlsae_model_mem_mb(wildcards):
    return config["models"][MLSAE["model"]]["mem_mb"]


def mlsae_train_acts(wildcards):
    return mlsae_acts(MLSAE["corpus"])


def mlsae_eval_acts(wildcards):
    return mlsae_acts(MLSAE["eval_corpus"])


def mlsae_train_args(wildcards):
    """Every training knob of one MLSAE as flags (a change reruns exactly it)."""
    sae = MLSAES[wildcards.mlsae_id]
    flags = [
        f"--expansion-factor {sae['expansion_factor']} --k {sae['k']}",
        f"--tokens {MLSAE['tokens']} --batch-size {MLSAE['batch_size']}",
        f"--lr-warmup-steps {MLSAE['lr_warmup_steps']} --k-aux {MLSAE['k_aux']}",
        f"--dead-tokens {MLSAE['dead_tokens']} --seed {MLSAE['seed']}",
        f"--buffer-tokens {MLSAE['buffer_tokens']}",
        f"--checkpoint-every {MLSAE['checkpoint_every']}",
    ]
    if MLSAE["lr"] is not None:
        flags.append(f"--lr {MLSAE['lr']}")
    if not MLSAE["standardise"]:
        flags.append("--no-standardise")
    return " ".join(flags)


def mlsae_layer_args(wildcards):
    return " ".join(str(layer) for layer in MLSAE_LAYERS)


def mlsae_targets():
    """What the default target builds for the MLSAEs."""
    if not MLSAES:
        return []
    return [
        "tables/mlsae_metrics.csv",
        "plots/mlsae/fvu_layers.pdf",
        *[f"plots/mlsae/dists_heatmap_{i}.pdf" for i in sorted(MLSAES)],
    ]


def mlsae_import_args(wildcards):
    entry = MLSAES[wildcards.mlsae_id]
    if "path" in entry:
        return f"--path {os.path.join(REPO, entry['path'])}"
    return f"--repo {entry['repo']}"


def mlsae_eval_files(kind):
    return [f"mlsae/eval/{i}/{kind}" for i in sorted(MLSAES)]
