# Figure 9 of "Decomposing the Dark Matter of SAEs": next-token CE with the SAE's reconstruction,
# plus its error's linear or nonlinear part, spliced into the model (per SAE of the family), and
# the table behind plots/figure9.pdf (drawn in figures.smk). Reads error_split's fitted map.
# Its configuration and helper functions are in dark_matter_common.smk.


rule downstream_ce:
    input:
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        fit="dark_matter/{sae_id}/{corpus}/fit.h5",
        tokens="data/tokens/{corpus}.h5",
        model=sae_model_input,
    output:
        result="dark_matter/{sae_id}/{corpus}/downstream_ce.json",
    log:
        "logs/downstream_ce/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/downstream_ce/{sae_id}/{corpus}.tsv"
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=sae_model_mem_mb,
        runtime=60,
        gpu=1,
    params:
        model=sae_model_path,
        site=sae_site,
        seqs=DCE.get("seqs", 32),
        batch_size=DCE.get("batch_size", 8),
        skip=config["activations"]["skip_positions"],
        code=code_version("dark_matter.downstream_ce", "sae_eval", "metrics"),
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
    log:
        "logs/downstream_ce_table/figure9.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        sae_ids=DM_SAES,
        nominal_l0=[nominal_l0(i) for i in DM_SAES],
        headline_l0=DM["headline_l0"],
        k_width=figure9_k_width,
        code=code_version("dark_matter.downstream_ce"),
    shell:
        "python -m saeflow.dark_matter.downstream_ce table --sae-ids {params.sae_ids}"
        " --results {input.results} --eval-metrics {input.eval_metrics} --out {output.table}"
        " --nominal-l0 {params.nominal_l0}"
        " --headline-l0 {params.headline_l0} {params.k_width} > {log} 2>&1"
