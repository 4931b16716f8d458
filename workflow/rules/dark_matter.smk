# Dark Matter analyses ("Decomposing the Dark Matter of SAEs"): per SAE, the linear / nonlinear
# split of its error and gradient pursuit on its decoder; over the configured family, the width
# power laws and the tables behind plots/figure1-5.pdf (drawn in figures.smk); per-token norms
# across widths (Figures 6, 10a, 11, 12), norm prediction (7), its baselines (13) and the norm
# probe against latent activations (14).
# Per-SAE jobs take 1 thread: they are independent, so -c2 runs two at once, and small
# multi-threaded GEMMs stall on a loaded machine.
# Its configuration and helper functions are in dark_matter_common.smk.


rule error_split:
    input:
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
    output:
        split="dark_matter/{sae_id}/{corpus}/split.h5",
        fit="dark_matter/{sae_id}/{corpus}/fit.h5",
        metrics="dark_matter/{sae_id}/{corpus}/metrics.json",
    log:
        "logs/error_split/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/error_split/{sae_id}/{corpus}.tsv"
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.error_split", "dark_matter.regression"),
    shell:
        "python -m saeflow.dark_matter.error_split --acts {input.acts}"
        " --sae-eval {input.sae_eval} --out {output.split} --fit {output.fit}"
        " --metrics {output.metrics} --test-fraction {params.test_fraction}"
        " --seed {params.seed} --chunk-tokens {params.chunk} --threads {threads}"
        " > {log} 2>&1"


rule encoder_pursuit:
    input:
        sae="saes/{sae_id}/cfg.json",
        weights="saes/{sae_id}/sae_weights.safetensors",
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
    output:
        pursuit="dark_matter/{sae_id}/{corpus}/pursuit.json",
    log:
        "logs/encoder_pursuit/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/encoder_pursuit/{sae_id}/{corpus}.tsv"
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        tokens=DM["pursuit_tokens"],
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["pursuit_chunk_tokens"],
        read_chunk=DM["chunk_tokens"],
        code=code_version(
            "dark_matter.encoder_pursuit",
            "dark_matter.pursuit",
            "dark_matter.regression",
            "dark_matter.error_split",
        ),
    shell:
        "python -m saeflow.dark_matter.encoder_pursuit --sae saes/{wildcards.sae_id}"
        " --acts {input.acts} --sae-eval {input.sae_eval} --out {output.pursuit}"
        " --sae-id {wildcards.sae_id} --tokens {params.tokens}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --chunk-tokens {params.chunk} --read-chunk-tokens {params.read_chunk}"
        " --threads {threads} > {log} 2>&1"


rule dark_matter_scaling:
    input:
        cfg=family_files("saes/{sae_id}/cfg.json"),
        eval_metrics=family_files("sae_eval/{sae_id}/{corpus}.metrics.json"),
        split_metrics=family_files("dark_matter/{sae_id}/{corpus}/metrics.json"),
        pursuit=family_files("dark_matter/{sae_id}/{corpus}/pursuit.json"),
    output:
        saes="tables/dark_matter_saes.csv",
        fits="tables/dark_matter_power_laws.csv",
    log:
        "logs/dark_matter_scaling/scaling.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        sae_ids=DM_SAES,
        nominal_l0=[nominal_l0(i) for i in DM_SAES],
        l0_targets=" ".join(["--l0-targets", *map(str, DM_L0_TARGETS)]) if DM_L0_TARGETS else "",
        n_boot=DM["n_boot"],
        seed=DM["seed"],
        code=code_version("dark_matter.scaling", "dark_matter.power_law"),
    shell:
        "python -m saeflow.dark_matter.scaling collect --sae-ids {params.sae_ids}"
        " --sae-cfg {input.cfg} --eval-metrics {input.eval_metrics}"
        " --split-metrics {input.split_metrics} --pursuit {input.pursuit}"
        " --saes-out {output.saes} --fits-out {output.fits}"
        " --nominal-l0 {params.nominal_l0} {params.l0_targets}"
        " --n-boot {params.n_boot} --seed {params.seed} > {log} 2>&1"


rule dark_matter_figure_table:
    input:
        saes="tables/dark_matter_saes.csv",
        fits="tables/dark_matter_power_laws.csv",
    output:
        table="tables/figure{figure}.csv",
    log:
        "logs/dark_matter_figure_table/figure{figure}.log",
    wildcard_constraints:
        figure=alternation(DM_SCALING_FIGURES),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        args=figure_table_args,
        code=code_version("dark_matter.scaling", "dark_matter.power_law"),
    shell:
        "python -m saeflow.dark_matter.scaling figure --figure {wildcards.figure}"
        " --saes {input.saes} --fits {input.fits} --out {output.table} {params.args}"
        " > {log} 2>&1"


rule dark_matter_per_token:
    input:
        sae_eval=family_files("sae_eval/{sae_id}/{corpus}.h5", DM_HEADLINE_SAES),
        split=family_files("dark_matter/{sae_id}/{corpus}/split.h5", DM_HEADLINE_SAES),
    output:
        fig6="tables/figure6.csv",
        fig10a="tables/figure10a.csv",
    log:
        "logs/dark_matter_per_token/per_token.log",
    benchmark:
        "benchmarks/dark_matter_per_token/per_token.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        sae_ids=DM_HEADLINE_SAES,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.per_token", "dark_matter.regression"),
    shell:
        "python -m saeflow.dark_matter.per_token --sae-ids {params.sae_ids}"
        " --sae-eval {input.sae_eval} --split {input.split} --fig6 {output.fig6}"
        " --fig10a {output.fig10a} --test-fraction {params.test_fraction}"
        " --seed {params.seed} --chunk-tokens {params.chunk} > {log} 2>&1"


rule dark_matter_token_window:
    input:
        sae_eval=family_files("sae_eval/{sae_id}/{corpus}.h5", DM_HEADLINE_SAES),
        split=family_files("dark_matter/{sae_id}/{corpus}/split.h5", DM_HEADLINE_SAES),
        tokenizer=dm_tokenizer_input,
    output:
        fig11="tables/figure11.csv",
        fig12="tables/figure12.csv",
    log:
        "logs/dark_matter_token_window/window.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        sae_ids=DM_HEADLINE_SAES,
        tokenizer=dm_tokenizer(),
        window_start=DM["window_start"],
        window_length=DM["window_length"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.per_token"),
    shell:
        "python -m saeflow.dark_matter.per_token --sae-ids {params.sae_ids}"
        " --sae-eval {input.sae_eval} --split {input.split} --fig11 {output.fig11}"
        " --fig12 {output.fig12} --window-start {params.window_start}"
        " --window-length {params.window_length} --tokenizer {params.tokenizer}"
        " --chunk-tokens {params.chunk} > {log} 2>&1"


rule norm_prediction:
    input:
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
        split="dark_matter/{sae_id}/{corpus}/split.h5",
    output:
        result="dark_matter/{sae_id}/{corpus}/norm_prediction.json",
    log:
        "logs/norm_prediction/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/norm_prediction/{sae_id}/{corpus}.tsv"
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        site=sae_site,
        k=sae_k_flag,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.norm_prediction", "dark_matter.regression"),
    shell:
        "python -m saeflow.dark_matter.norm_prediction fit --acts {input.acts}"
        " --sae-eval {input.sae_eval} --split {input.split} --out {output.result}"
        " --sae-id {wildcards.sae_id} --site {params.site} {params.k}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --chunk-tokens {params.chunk} > {log} 2>&1"


rule norm_baselines:
    input:
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
        lm_loss=sae_lm_loss,
    output:
        result="dark_matter/{sae_id}/{corpus}/norm_baselines.json",
    log:
        "logs/norm_baselines/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/norm_baselines/{sae_id}/{corpus}.tsv"
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        site=sae_site,
        k=sae_k_flag,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version(
            "dark_matter.norm_baselines",
            "dark_matter.norm_prediction",
            "dark_matter.per_token",
            "dark_matter.regression",
        ),
    shell:
        "python -m saeflow.dark_matter.norm_baselines fit --acts {input.acts}"
        " --sae-eval {input.sae_eval} --lm-loss {input.lm_loss} --out {output.result}"
        " --sae-id {wildcards.sae_id} --site {params.site} {params.k}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --chunk-tokens {params.chunk} > {log} 2>&1"


rule dark_matter_norm_table:
    input:
        norm_prediction=family_files("dark_matter/{sae_id}/{corpus}/norm_prediction.json"),
    output:
        table="tables/figure7.csv",
    log:
        "logs/dark_matter_norm_table/figure7.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=code_version("dark_matter.norm_prediction"),
    shell:
        "python -m saeflow.dark_matter.norm_prediction table --inputs {input.norm_prediction}"
        " --out {output.table} > {log} 2>&1"


rule dark_matter_baselines_table:
    input:
        norm_baselines=family_files(
            "dark_matter/{sae_id}/{corpus}/norm_baselines.json", DM_BASELINE_SAES
        ),
    output:
        table="tables/figure13.csv",
    log:
        "logs/dark_matter_baselines_table/figure13.log",
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=code_version("dark_matter.norm_baselines", "dark_matter.norm_prediction"),
    shell:
        "python -m saeflow.dark_matter.norm_baselines table --inputs {input.norm_baselines}"
        " --out {output.table} > {log} 2>&1"


rule probe_similarity:
    input:
        sae=family_files("saes/{sae_id}/cfg.json", DM_PROBE_SAE),
        weights=family_files("saes/{sae_id}/sae_weights.safetensors", DM_PROBE_SAE),
        acts=probe_acts(),
        sae_eval=family_files("sae_eval/{sae_id}/{corpus}.h5", DM_PROBE_SAE),
    output:
        table="tables/figure14.csv",
        metrics=family_files("dark_matter/{sae_id}/{corpus}/probe_similarity.json", DM_PROBE_SAE),
    log:
        "logs/probe_similarity/figure14.log",
    benchmark:
        "benchmarks/probe_similarity/figure14.tsv"
    conda:
        "../../envs/saeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        sae_id=DM_PROBE_SAE,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        smooth=DM["probe_smooth"],
        intercept="--intercept" if DM["probe_intercept"] else "--no-intercept",
        chunk=DM["chunk_tokens"],
        code=code_version(
            "dark_matter.probe_similarity",
            "dark_matter.norm_prediction",
            "dark_matter.regression",
        ),
    shell:
        "python -m saeflow.dark_matter.probe_similarity --sae saes/{params.sae_id}"
        " --acts {input.acts} --sae-eval {input.sae_eval} --out {output.table}"
        " --metrics {output.metrics} --sae-id {params.sae_id}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --smooth {params.smooth} {params.intercept} --chunk-tokens {params.chunk}"
        " --threads {threads}"
        " > {log} 2>&1"
