# Figure 10b of "Decomposing the Dark Matter of SAEs": held-out R² of predicting one SAE's error
# (and its linear and nonlinear parts) from the activations, reconstructions and error parts of
# SAEs at other sites of the same model: tables/figure10b.csv, drawn in figures.smk.
# Its configuration and helper functions are in dark_matter_common.smk.


rule cross_site:
    input:
        acts=cross_site_files("acts/{model}/{corpus}/{site}.h5"),
        evals=cross_site_files("sae_eval/{sae_id}/{corpus}.h5"),
        splits=cross_site_files("dark_matter/{sae_id}/{corpus}/split.h5"),
    output:
        table="tables/figure10b.csv",
    log:
        "logs/cross_site/figure10b.log",
    benchmark:
        "benchmarks/cross_site/figure10b.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=cross_site_mem_mb,
        runtime=120,
    params:
        sae_ids=XSITE_SAES,
        sources=cross_site_sources,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.cross_site", "dark_matter.regression"),
    shell:
        "python -m saeflow.dark_matter.cross_site --target-eval {input.evals[0]}"
        " --target-split {input.splits[0]} {params.sources} --out {output.table}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --chunk-tokens {params.chunk} --threads {threads} > {log} 2>&1"
