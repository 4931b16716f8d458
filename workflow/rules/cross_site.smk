# Figure 10b of "Decomposing the Dark Matter of SAEs": held-out R² of predicting one SAE's error
# (and its linear and nonlinear parts) from the activations, reconstructions and error parts of
# SAEs at other sites of the same model: tables/figure10b.csv, drawn in figures.smk.

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


rule cross_site:
    input:
        acts=cross_site_files("acts/{model}/{corpus}/{site}.h5"),
        evals=cross_site_files("sae_eval/{sae_id}/{corpus}.h5"),
        splits=cross_site_files("dark_matter/{sae_id}/{corpus}/split.h5"),
    output:
        table="tables/figure10b.csv",
    params:
        sae_ids=XSITE_SAES,
        sources=cross_site_sources,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.cross_site", "dark_matter.regression"),
    log:
        "logs/cross_site/figure10b.log",
    benchmark:
        "benchmarks/cross_site/figure10b.tsv"
    threads: 1
    resources:
        mem_mb=cross_site_mem_mb,
        runtime=120,
    shell:
        "python -m saeflow.dark_matter.cross_site --target-eval {input.evals[0]}"
        " --target-split {input.splits[0]} {params.sources} --out {output.table}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --chunk-tokens {params.chunk} --threads {threads} > {log} 2>&1"
