# The Dark Matter stages' share of common.smk: the configuration they read and the named helper
# functions of dark_matter.smk, downstream_ce.smk, noise_simulation.smk, cross_site.smk and
# figures.smk. Kept out of those files so that each holds rules only (snakemake --lint); included
# from the Snakefile just before dark_matter.smk, the first of them.


# dark_matter.smk

DM = config["dark_matter"]
# (none without a family: stand-alone pretrained SAEs carry no family either)
DM_SAES = sorted(i for i, s in SAES.items() if DM["family"] and s.get("family") == DM["family"])
DM_SCALING_FIGURES = ["1", "2", "3", "4", "5"]
DM_PER_TOKEN_FIGURES = ["6", "10a", "11", "12"]
DM_FIGURES = DM_SCALING_FIGURES + ["6", "7", "10a", "11", "12", "13", "14"]


def nominal_l0(sae_id):
    """An SAE's sparsity key: its k, else the nominal L0 of a pretrained release ("nan": none)."""
    sae = SAES[sae_id]
    value = sae.get("k", sae.get("l0"))
    return "nan" if value is None else value


# a TopK family is grouped by k; one without a shared k (Gemma Scope) by target L0
DM_SHARED_K = bool(DM_SAES) and all(SAES[i].get("k") is not None for i in DM_SAES)
DM_L0_TARGETS = [] if DM_SHARED_K else sorted({DM["headline_l0"], *DM.get("l0_targets", [])})


def headline_saes():
    """The family's SAEs at its k closest to headline_l0 (smaller k on a tie, as scaling.py);
    for a family without k (Gemma Scope), per width the SAE whose nominal L0 is closest to
    headline_l0 (smaller L0 on a tie), as the paper's L0~60 selection."""
    if DM_SHARED_K:
        ks = sorted({SAES[i]["k"] for i in DM_SAES})
        k = min(ks, key=lambda k: (abs(k - DM["headline_l0"]), k))
        return sorted((i for i in DM_SAES if SAES[i]["k"] == k), key=lambda i: SAES[i]["d_sae"])
    by_width = {}
    for i in DM_SAES:
        if SAES[i].get("l0") is not None:
            by_width.setdefault(SAES[i]["d_sae"], []).append(i)

    def distance(sae_id):
        return abs(SAES[sae_id]["l0"] - DM["headline_l0"]), SAES[sae_id]["l0"]

    return [min(by_width[w], key=distance) for w in sorted(by_width)]


def listed_saes(key, default):
    """SAE ids a dark_matter key lists, each checked to be declared."""
    value = DM[key]
    names = (value if isinstance(value, list) else [value]) if value else default
    unknown = [n for n in names if n not in SAES]
    if unknown:
        raise WorkflowError(
            f"dark_matter.{key}: {unknown} not among the declared SAEs {sorted(SAES)}"
        )
    return names


def check_window():
    """Figures 11-12's window must start inside the evaluation tokens; say so before any job."""
    corpus = config["corpora"][EVAL_CORPUS]
    kept = corpus["ctx_len"] - config["activations"]["skip_positions"]
    n_tokens = corpus["n_seq"] * kept
    if DM["family"] and DM["window_start"] >= n_tokens:
        raise WorkflowError(
            f"dark_matter.window_start: {DM['window_start']} is past the {n_tokens} evaluation "
            f"tokens of corpora.{EVAL_CORPUS} (n_seq x (ctx_len - skip_positions))"
        )


check_window()
DM_HEADLINE_SAES = headline_saes()
DM_BASELINE_SAES = listed_saes("baseline_saes", DM_SAES)
DM_PROBE_SAE = listed_saes("probe_sae", DM_HEADLINE_SAES[-1:])


def family_files(pattern, sae_ids=None):
    """One path per SAE (default: the Dark Matter family) on the evaluation corpus, in order."""
    ids = DM_SAES if sae_ids is None else sae_ids
    return [pattern.format(sae_id=sae_id, corpus=EVAL_CORPUS) for sae_id in ids]


def sae_k_flag(wildcards):
    """``--k K`` for SAEs with a k (TopK, BatchTopK), nothing for the others."""
    k = SAES[wildcards.sae_id].get("k")
    return f"--k {k}" if k is not None else ""


def sae_lm_loss(wildcards):
    return f"acts/{SAES[wildcards.sae_id]['model']}/{wildcards.corpus}/lm_loss.h5"


def dm_tokenizer_input(wildcards):
    return model_files(SAES[DM_HEADLINE_SAES[0]]["model"]) if DM_HEADLINE_SAES else []


def probe_acts():
    """Activations the probe SAE was evaluated on (its site, the evaluation corpus)."""
    return [f"acts/{SAES[i]['model']}/{EVAL_CORPUS}/{SAES[i]['site']}.h5" for i in DM_PROBE_SAE]


def dm_tokenizer():
    return model_path(SAES[DM_HEADLINE_SAES[0]]["model"]) if DM_HEADLINE_SAES else ""


def figure_table_args(wildcards):
    """Only the knobs a figure's table uses, so a change rebuilds only that table."""
    if wildcards.figure == "1":
        return f"--headline-l0 {DM['headline_l0']} --extrapolate {DM['extrapolate']}"
    return ""


# downstream_ce.smk

DCE = DM.get("downstream_ce", {})


def configured_sae(sae_id, key):
    """``sae_id`` if given (checked), else the family's narrowest SAE at the L0 closest to
    headline_l0 (the original's "16k, L0 ~ 60" choice for Figures 10b and 15)."""
    if sae_id:
        if sae_id not in SAES:
            raise WorkflowError(
                f"{key}: '{sae_id}' is not an SAE of this config (known: {', '.join(sorted(SAES))})"
            )
        return sae_id
    if not DM_SAES:
        return None

    def width_l0(candidate):
        sae = SAES[candidate]
        l0 = sae.get("k", sae.get("l0"))
        return sae.get("d_sae", sae.get("width")), abs(l0 - DM["headline_l0"]), l0

    return min(DM_SAES, key=width_l0)


def figure9_k_width(wildcards):
    """--k-width only when the config names one, so the default follows the family's widths."""
    width = DCE.get("k_width")
    return "" if width is None else f"--k-width {width}"


# noise_simulation.smk

NSIM = DM.get("noise_simulation", {})


def noise_simulation_sae():
    """The configured SAE, else the family's narrowest SAE at the L0 closest to headline_l0."""
    return configured_sae(NSIM.get("sae"), "dark_matter.noise_simulation.sae")


NSIM_SAE = noise_simulation_sae()


def noise_simulation_mem_mb(wildcards):
    """About ten float64 copies of the [tokens, d_model] activations (d 4096 if not known)."""
    from saeflow.models import describe

    dims = describe(config["models"][SAES[wildcards.sae_id]["model"]]["path"])
    d = dims[1] if dims is not None else 4096
    return max(2000, int(10 * 8 * NSIM.get("tokens", 8192) * d / 1e6) + 1000)


# cross_site.smk

XSITE = DM.get("cross_site", {})
XSITE_TARGET = configured_sae(XSITE.get("target"), "dark_matter.cross_site.target")


def cross_site_saes():
    """The target SAE (its own site first), then the configured source SAEs."""
    if XSITE_TARGET is None:
        return []
    model = SAES[XSITE_TARGET]["model"]
    for i, sae_id in enumerate(XSITE.get("sources", [])):
        key = f"dark_matter.cross_site.sources[{i}]"
        configured_sae(sae_id, key)
        if SAES[sae_id]["model"] != model:
            raise WorkflowError(
                f"{key}: '{sae_id}' belongs to model '{SAES[sae_id]['model']}', the target "
                f"'{XSITE_TARGET}' to '{model}'; the sites must be of one model"
            )
    return [XSITE_TARGET, *XSITE.get("sources", [])]


XSITE_SAES = cross_site_saes()


def cross_site_mem_mb(wildcards):
    """Normal equations per (source, predictor): d x 4d float64 each (d 4096 if not known)."""
    from saeflow.models import describe

    if not XSITE_SAES:
        return 2000
    dims = describe(config["models"][SAES[XSITE_SAES[0]]["model"]]["path"])
    d = dims[1] if dims is not None else 4096
    fits = 4 * len(XSITE_SAES)
    return max(4000, int(fits * 8 * d * 4 * d / 1e6 * 1.5) + 2000)


def cross_site_files(pattern):
    return [
        pattern.format(sae_id=s, model=SAES[s]["model"], site=SAES[s]["site"], corpus=EVAL_CORPUS)
        for s in XSITE_SAES
    ]


def cross_site_sources(wildcards, input):
    """--source SITE ACTS EVAL SPLIT per SAE, labelled by the SAE's hook site."""
    parts = zip(XSITE_SAES, input.acts, input.evals, input.splits)
    return " ".join(
        f"--source {SAES[s]['site']} {acts} {ev} {split}" for s, acts, ev, split in parts
    )


# figures.smk


def plot_options(wildcards):
    """The figure's plotting options as command-line flags (log_x -> --log-x / --no-log-x)."""
    flags = []
    for key, value in sorted(config["figures"][f"figure{wildcards.figure}"].items()):
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags.append(f"--{flag} {value}")
    return " ".join(flags)
