# Figure 9 of "Decomposing the Dark Matter of SAEs": next-token CE with the SAE's reconstruction,
# plus its error's linear or nonlinear part, spliced into the model (per SAE of the family), and
# the table behind plots/figure9.pdf (drawn in figures.smk). Reads error_split's fitted map.

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


rule downstream_ce:
    input:
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        fit="dark_matter/{sae_id}/{corpus}/fit.h5",
        tokens="data/tokens/{corpus}.h5",
        model=sae_model_input,
    output:
        result="dark_matter/{sae_id}/{corpus}/downstream_ce.json",
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    params:
        model=sae_model_path,
        site=sae_site,
        seqs=DCE.get("seqs", 32),
        batch_size=DCE.get("batch_size", 8),
        skip=config["activations"]["skip_positions"],
        code=code_version("dark_matter.downstream_ce", "sae_eval", "metrics"),
    log:
        "logs/downstream_ce/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/downstream_ce/{sae_id}/{corpus}.tsv"
    threads: 1
    resources:
        mem_mb=sae_model_mem_mb,
        runtime=60,
        gpu=1,
    shell:
        "python -m saeflow.dark_matter.downstream_ce run --sae saes/{wildcards.sae_id}"
        " --fit {input.fit} --model {params.model} --tokens {input.tokens} --site {params.site}"
        " --out {output.result} --sae-id {wildcards.sae_id} --seqs {params.seqs}"
        " --batch-size {params.batch_size} --skip-positions {params.skip} --threads {threads}"
        " --device auto > {log} 2>&1"


rule downstream_ce_table:
    input:
        results=family_files("dark_matter/{sae_id}/{corpus}/downstream_ce.json"),
        eval_metrics=family_files("sae_eval/{sae_id}/{corpus}.metrics.json"),
    output:
        table="tables/figure9.csv",
    params:
        sae_ids=DM_SAES,
        nominal_l0=[nominal_l0(i) for i in DM_SAES],
        headline_l0=DM["headline_l0"],
        k_width=figure9_k_width,
        code=code_version("dark_matter.downstream_ce"),
    log:
        "logs/downstream_ce_table/figure9.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m saeflow.dark_matter.downstream_ce table --sae-ids {params.sae_ids}"
        " --results {input.results} --eval-metrics {input.eval_metrics} --out {output.table}"
        " --nominal-l0 {params.nominal_l0}"
        " --headline-l0 {params.headline_l0} {params.k_width} > {log} 2>&1"
