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
MLSAE_BASELINES = mlsae_config.baselines(config)
MLSAE_BASELINE_IDS = sorted(MLSAE_BASELINES)
MLSAE_EXAMPLES = mlsae_config.example_mlsaes(config)


# the figures of plot_mlsae_summary (saeflow.figures.mlsae summary), each beside its CSV
MLSAE_SUMMARY_FIGURES = ["mmcs", "resid_cos_sim", "embed_cos_sim", "layer_std", "sweep"]


def mlsae_entry(sae_id):
    """The sweep entry of an MLSAE or of a single-layer baseline."""
    return MLSAES[sae_id] if sae_id in MLSAES else MLSAE_BASELINES[sae_id]


def mlsae_id_layers(sae_id):
    """The layers an MLSAE (all of the section's) or a baseline (its one) reads."""
    if sae_id in MLSAE_BASELINES:
        return [MLSAE_BASELINES[sae_id]["layer"]]
    return MLSAE_LAYERS


def mlsae_cache_args(wildcards, output):
    return " ".join(f"--site {s} --out {o}" for s, o in zip(MLSAE_SITES, output))


def mlsae_model_files(wildcards):
    return model_files(MLSAE["model"])


def mlsae_model_path(wildcards):
    return model_path(MLSAE["model"])


def mlsae_model_mem_mb(wildcards):
    return config["models"][MLSAE["model"]]["mem_mb"]


def mlsae_id_acts(sae_id, corpus):
    return [
        f"mlsae/acts/{MLSAE['model']}/{corpus}/blocks.{layer}.hook_resid_post.h5"
        for layer in mlsae_id_layers(sae_id)
    ]


def mlsae_train_inputs(wildcards):
    """Cached activations of every layer read, or (on the fly) the model and tokens."""
    if MLSAE["train_activations"] == "on_the_fly":
        return {
            "model": mlsae_model_files(wildcards),
            "tokens": f"data/tokens/{MLSAE['corpus']}.h5",
        }
    return {"acts": mlsae_id_acts(wildcards.mlsae_id, MLSAE["corpus"])}


def mlsae_train_source(wildcards, input):
    """The training command's batch source flags (see mlsae_train_inputs)."""
    if MLSAE["train_activations"] == "on_the_fly":
        return (
            f"--model {mlsae_model_path(wildcards)} --tokens-file {input.tokens}"
            f" --skip-positions {config['activations']['skip_positions']}"
            f" --seqs-per-pass {MLSAE['seqs_per_pass']}"
            f" --dtype {config['models'][MLSAE['model']]['dtype']}"
        )
    return f"--acts {' '.join(input.acts)}"


def mlsae_eval_acts(wildcards):
    return mlsae_id_acts(wildcards.mlsae_id, MLSAE["eval_corpus"])


def mlsae_train_args(wildcards):
    """Every training knob of one MLSAE as flags (a change reruns exactly it)."""
    sae = mlsae_entry(wildcards.mlsae_id)
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
    return " ".join(str(layer) for layer in mlsae_id_layers(wildcards.mlsae_id))


def mlsae_targets():
    """What the default target builds for the MLSAEs."""
    if not MLSAES:
        return []
    return [
        "tables/mlsae_metrics.csv",
        *(["tables/mlsae_vs_single_layer.csv"] if MLSAE_BASELINES else []),
        *[f"plots/mlsae/{name}.pdf" for name in MLSAE_SUMMARY_FIGURES],
        *[f"plots/mlsae/prompt_heatmap_{i}.pdf" for i in sorted(MLSAES)],
        *[f"mlsae/analysis/{i}/examples_loaded.json" for i in MLSAE_EXAMPLES],
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


def mlsae_baseline_files(kind):
    return [f"mlsae/eval/{i}/{kind}" for i in MLSAE_BASELINE_IDS]


def mlsae_compared_files(kind):
    """The evaluation files of the MLSAEs that have baselines."""
    compared = sorted({b["mlsae_id"] for b in MLSAE_BASELINES.values()})
    return [f"mlsae/eval/{i}/{kind}" for i in compared]


def mlsae_baseline_pairs(wildcards):
    """--pair BASELINE=MLSAE for every baseline (the MLSAE it is compared with)."""
    return " ".join(f"--pair {i}={MLSAE_BASELINES[i]['mlsae_id']}" for i in MLSAE_BASELINE_IDS)


def mlsae_sae_files(name):
    """A file of every MLSAE and baseline folder (the similarity analyses read them all)."""
    return [f"mlsae/saes/{i}/{name}" for i in sorted(MLSAES) + MLSAE_BASELINE_IDS]


def mlsae_similarity_args(wildcards):
    return " ".join(f"{i}=mlsae/saes/{i}" for i in sorted(MLSAES) + MLSAE_BASELINE_IDS)
