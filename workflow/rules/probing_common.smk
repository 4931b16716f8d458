# Helpers of probing.smk: the configuration it reads and the named functions its rules call.
# Kept out of that file so that it holds rules only (snakemake --lint); included from the
# Snakefile just before probing.smk.

from saeflow.probing.datasets import OOD_DATASETS, binary_datasets
from saeflow.probing.regimes import REGIMES

PROBING = config.get("probing", {})
PROBING_MODEL = PROBING.get("model")


def probing_datasets():
    """Dataset names probed: the 113 binary ones for "all", else the configured list."""
    names = PROBING.get("datasets", "all")
    return list(binary_datasets()) if names == "all" else list(names)


def probing_ood_datasets():
    """Probed datasets that have an OOD set, when probing.ood is set (else none)."""
    if not PROBING.get("ood"):
        return []
    names = [d for d in probing_datasets() if d in OOD_DATASETS]
    if not names:
        raise ValueError(
            f"probing.ood is true but none of probing.datasets has an OOD set; "
            f"expected one of {', '.join(OOD_DATASETS)}"
        )
    return names


def probing_act_names():
    """Every activation file of the model: the datasets, then the OOD sets (NAME_OOD)."""
    return probing_datasets() + [f"{d}_OOD" for d in probing_ood_datasets()]


def probing_regimes():
    """normal, every regime whose grid is not empty, and ood when probing.ood is set."""
    grids = PROBING.get("regimes", {})
    regimes = ["normal"] + [r for r in ("scarcity", "imbalance", "label_noise") if grids.get(r)]
    return regimes + (["ood"] if probing_ood_datasets() else [])


def probing_site_args():
    return " ".join(f"--site {s}" for s in probing_sites())


def probing_sites():
    """Sites cached: the baselines' and those the probed SAEs read."""
    sites = set(PROBING.get("sites", [])) | set(PROBING.get("regime_sites") or [])
    saes = set(PROBING.get("saes", [])) | set(PROBING.get("regime_saes") or [])
    saes |= set(PROBING.get("ood_saes") or [])
    return sorted(sites | {SAES[i]["site"] for i in saes})


def probing_custom_args():
    return " ".join(
        f"--custom {n}={os.path.join(REPO, p)}" for n, p in PROBING.get("custom", {}).items()
    )


def probing_acts_args(wildcards, output):
    return " ".join(f"--dataset {d} --out {o}" for d, o in zip(probing_act_names(), output))


def probing_sae_acts_args(wildcards, input, output):
    return " ".join(f"--acts {a} --out {o}" for a, o in zip(input.acts, output))


def probing_layer(site):
    return int(site.split(".")[1])


def probing_site_layer(wildcards):
    return probing_layer(wildcards.site)


def probing_sae_layer(wildcards):
    return probing_layer(SAES[wildcards.sae_id]["site"])


def probing_values(wildcards):
    return " ".join(str(v) for v in PROBING.get("regimes", {}).get(wildcards.regime, []))


def probing_methods(wildcards):
    """Baseline methods: `methods` in the normal regime, `regime_methods` in the others."""
    key = "methods" if wildcards.regime == "normal" else "regime_methods"
    return " ".join(PROBING.get(key, ["logreg"]))


def probing_ks(wildcards):
    key = "ks" if wildcards.regime == "normal" else "regime_ks"
    return " ".join(str(k) for k in PROBING[key])


def probing_all_acts(wildcards):
    return [f"probing/acts/{PROBING_MODEL}/{d}.h5" for d in probing_act_names()]


def probing_regime_datasets(regime):
    """Datasets probed in a regime: those with an OOD set in ood, else all."""
    return probing_ood_datasets() if regime == "ood" else probing_datasets()


def probing_regime_acts(wildcards):
    names = probing_regime_datasets(wildcards.regime)
    return [f"probing/acts/{PROBING_MODEL}/{d}.h5" for d in names]


def probing_regime_ood_acts(wildcards):
    names = probing_ood_datasets() if wildcards.regime == "ood" else []
    return [f"probing/acts/{PROBING_MODEL}/{d}_OOD.h5" for d in names]


def probing_regime_sae_acts(wildcards):
    names = probing_regime_datasets(wildcards.regime)
    return [f"probing/sae_acts/{wildcards.sae_id}/{d}.h5" for d in names]


def probing_regime_ood_sae_acts(wildcards):
    names = probing_ood_datasets() if wildcards.regime == "ood" else []
    return [f"probing/sae_acts/{wildcards.sae_id}/{d}_OOD.h5" for d in names]


def probing_ood_args(wildcards, input):
    return " ".join(f"--ood-acts {a}" for a in input.ood)


def probing_regime_list(key, regime):
    """`sites` or `saes` of a regime: normal probes them all, the others `regime_{key}` if set
    (and ood `ood_saes` if set)."""
    chosen = PROBING.get(f"regime_{key}") if regime != "normal" else None
    if regime == "ood" and key == "saes" and PROBING.get("ood_saes") is not None:
        chosen = PROBING["ood_saes"]
    return PROBING.get(key, []) if chosen is None else chosen


def probing_regime_baselines(wildcards):
    return [
        f"probing/baselines/{s}/{wildcards.regime}.csv"
        for s in probing_regime_list("sites", wildcards.regime)
    ]


def probing_regime_saes(wildcards):
    return [
        f"probing/sae_probes/{i}/{wildcards.regime}.csv"
        for i in probing_regime_list("saes", wildcards.regime)
    ]


def probing_acts_list(wildcards, input):
    return " ".join(f"--acts {a}" for a in input.acts)


def probing_sae_acts_list(wildcards, input):
    return " ".join(f"--sae-acts {a}" for a in input.acts)


def probing_figure_args(wildcards, input):
    return " ".join(
        [f"--baseline {b}" for b in input.baselines] + [f"--sae {s}" for s in input.saes]
    )


def probing_targets():
    """Every probing table and figure (none without probing.model)."""
    if not PROBING_MODEL:
        return []
    return (
        ["tables/probing_datasets.csv"]
        + [f"plots/probing/{r}.pdf" for r in probing_regimes()]
        + (
            ["plots/probing/k_vs_auc.pdf", "plots/probing/by_layer.pdf"]
            if "normal" in probing_regimes()
            else []
        )
        + probing_multi_targets()
    )


MULTI_TOKEN = PROBING.get("multi_token") or {}
MULTI_SITE = MULTI_TOKEN.get("site") if PROBING_MODEL else None


def probing_multi_datasets():
    return list(MULTI_TOKEN.get("datasets", []))


def probing_multi_acts(wildcards):
    return [f"probing/multi_acts/{PROBING_MODEL}/{d}.h5" for d in probing_multi_datasets()]


def probing_multi_saes(wildcards):
    return [f"saes/{i}/sae_weights.safetensors" for i in MULTI_TOKEN.get("saes", [])]


def probing_multi_sae_args(wildcards):
    return " ".join(f"--sae saes/{i} --sae-id {i}" for i in MULTI_TOKEN.get("saes", []))


def probing_multi_targets():
    """The multi-token figure when probing.multi_token.site is set."""
    return ["plots/probing/multi_token.pdf"] if MULTI_SITE else []
