# Figure 15 and Table 1 of "Decomposing the Dark Matter of SAEs": a synthetic SAE built from one
# real SAE (its reconstruction as ground truth, its rarest latents ablated, Gaussian activation
# and reconstruction noise), and the tables behind plots/figure15.pdf and tables/table1.csv.
# Its configuration and helper functions are in dark_matter_common.smk.


rule noise_simulation:
    input:
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
    output:
        runs="dark_matter/{sae_id}/{corpus}/noise_simulation.csv",
    log:
        "logs/noise_simulation/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/noise_simulation/{sae_id}/{corpus}.tsv"
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=noise_simulation_mem_mb,
        runtime=60,
    params:
        tokens=NSIM.get("tokens", 8192),
        percents=" ".join(map(str, NSIM.get("ablate_percents", [0, 10, 20, 30, 40, 50]))),
        act_noise=NSIM.get("act_noise", 1.0),
        rec_noise=NSIM.get("rec_noise", 0.6),
        grid=" ".join(map(str, NSIM.get("grid", [0, 1, 2, 3, 4]))),
        unit=NSIM.get("noise_unit", 0.1),
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        code=code_version("dark_matter.noise_simulation", "dark_matter.regression"),
    shell:
        "python -m saeflow.dark_matter.noise_simulation run --sae saes/{wildcards.sae_id}"
        " --acts {input.acts} --sae-eval {input.sae_eval} --out {output.runs}"
        " --tokens {params.tokens} --ablate-percents {params.percents}"
        " --act-noise {params.act_noise} --rec-noise {params.rec_noise} --grid {params.grid}"
        " --noise-unit {params.unit} --test-fraction {params.test_fraction} --seed {params.seed}"
        " --threads {threads} > {log} 2>&1"


rule noise_simulation_tables:
    input:
        runs=f"dark_matter/{NSIM_SAE}/{EVAL_CORPUS}/noise_simulation.csv",
    output:
        figure15="tables/figure15.csv",
        table1="tables/table1.csv",
    log:
        "logs/noise_simulation_tables/tables.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("dark_matter.noise_simulation"),
    shell:
        "python -m saeflow.dark_matter.noise_simulation tables --runs {input.runs}"
        " --figure15 {output.figure15} --table1 {output.table1} > {log} 2>&1"
