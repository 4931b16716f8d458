# Dark Matter analyses ("Decomposing the Dark Matter of SAEs"): per SAE, the linear / nonlinear
# split of its error and gradient pursuit on its decoder; over the configured family, the width
# power laws and the tables behind plots/figure1-5.pdf (drawn in figures.smk); per-token norms
# across widths (Figures 6, 10a, 11, 12), norm prediction (7), its baselines (13) and the norm
# probe against latent activations (14).
# Per-SAE jobs take 1 thread: they are independent, so -c2 runs two at once, and small
# multi-threaded GEMMs stall on a loaded machine.

DM = config["dark_matter"]
DM_SAES = sorted(i for i, s in SAES.items() if s.get("family") == DM["family"])
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
        raise WorkflowError(f"dark_matter.{key}: {unknown} not among the declared SAEs {sorted(SAES)}")
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


rule error_split:
    input:
        acts=sae_eval_acts,
        sae_eval="sae_eval/{sae_id}/{corpus}.h5",
    output:
        split="dark_matter/{sae_id}/{corpus}/split.h5",
        fit="dark_matter/{sae_id}/{corpus}/fit.h5",
        metrics="dark_matter/{sae_id}/{corpus}/metrics.json",
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    params:
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.error_split", "dark_matter.regression"),
    log:
        "logs/error_split/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/error_split/{sae_id}/{corpus}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
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
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
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
    log:
        "logs/encoder_pursuit/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/encoder_pursuit/{sae_id}/{corpus}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
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
    params:
        sae_ids=DM_SAES,
        nominal_l0=[nominal_l0(i) for i in DM_SAES],
        l0_targets=" ".join(["--l0-targets", *map(str, DM_L0_TARGETS)]) if DM_L0_TARGETS else "",
        n_boot=DM["n_boot"],
        seed=DM["seed"],
        code=code_version("dark_matter.scaling", "dark_matter.power_law"),
    log:
        "logs/dark_matter_scaling/scaling.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
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
    wildcard_constraints:
        figure=alternation(DM_SCALING_FIGURES),
    params:
        args=figure_table_args,
        code=code_version("dark_matter.scaling", "dark_matter.power_law"),
    log:
        "logs/dark_matter_figure_table/figure{figure}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
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
    params:
        sae_ids=DM_HEADLINE_SAES,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.per_token", "dark_matter.regression"),
    log:
        "logs/dark_matter_per_token/per_token.log",
    benchmark:
        "benchmarks/dark_matter_per_token/per_token.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
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
    params:
        sae_ids=DM_HEADLINE_SAES,
        tokenizer=dm_tokenizer(),
        window_start=DM["window_start"],
        window_length=DM["window_length"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.per_token"),
    log:
        "logs/dark_matter_token_window/window.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
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
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
    params:
        site=sae_site,
        k=sae_k_flag,
        test_fraction=DM["test_fraction"],
        seed=DM["seed"],
        chunk=DM["chunk_tokens"],
        code=code_version("dark_matter.norm_prediction", "dark_matter.regression"),
    log:
        "logs/norm_prediction/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/norm_prediction/{sae_id}/{corpus}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
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
    wildcard_constraints:
        sae_id=alternation(sorted(SAES)),
        corpus=alternation(sorted(config["corpora"])),
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
    log:
        "logs/norm_baselines/{sae_id}/{corpus}.log",
    benchmark:
        "benchmarks/norm_baselines/{sae_id}/{corpus}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
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
    params:
        code=code_version("dark_matter.norm_prediction"),
    log:
        "logs/dark_matter_norm_table/figure7.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
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
    params:
        code=code_version("dark_matter.norm_baselines", "dark_matter.norm_prediction"),
    log:
        "logs/dark_matter_baselines_table/figure13.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
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
    log:
        "logs/probe_similarity/figure14.log",
    benchmark:
        "benchmarks/probe_similarity/figure14.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "python -m saeflow.dark_matter.probe_similarity --sae saes/{params.sae_id}"
        " --acts {input.acts} --sae-eval {input.sae_eval} --out {output.table}"
        " --metrics {output.metrics} --sae-id {params.sae_id}"
        " --test-fraction {params.test_fraction} --seed {params.seed}"
        " --smooth {params.smooth} {params.intercept} --chunk-tokens {params.chunk}"
        " --threads {threads}"
        " > {log} 2>&1"
