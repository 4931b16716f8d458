"""Feature-analysis throughput against the bare SAE evaluation pass, on the same tokens.

Issue 11's goal: the analysis (``saeflow.analysis.analyze``: two statistics passes over the CSR
latents, the context-window pass, W_dec·W_U logits, decoder neighbours, the JSON documents) runs at
≥ 0.5× the tokens/s of the evaluation pass alone (``saeflow.sae_eval.evaluate_reconstruction``:
encode every cached token, write the error vectors and the CSR latents). Both read the same
activations file; the analysis reads the evaluation file the timed pass has just written. The two
are interleaved ``--rounds`` times so that load from other processes hits them alike; the median
counts. Loading the SAE and the model's unembedding is timed apart (``setup_s``), since the pass
the goal compares against does no such load either.

Usage (on a finished run of the default, from the repository root)::

    python benchmarks/bench_analysis.py --results results --sae resid6_topk-w2304-k32 \\
        --out benchmarks/results/analysis_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from host import host

from saeflow.analysis import analyze
from saeflow.sae_eval import evaluate_reconstruction
from saeflow.saes import load_sae


def cpu_seconds_of_others() -> float:
    """CPU seconds all processes but this one have used (from /proc/stat, minus our own)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = sum(int(f) for f in fields[:3]) + sum(int(f) for f in fields[5:8])  # busy, not idle
    own = os.times()
    return ticks / os.sysconf("SC_CLK_TCK") - (own.user + own.system)


def analysis_args(ns: argparse.Namespace, info: str, acts: str, out_dir: str) -> argparse.Namespace:
    """The analyzer's arguments as the default's rule passes them (config analysis section)."""
    return analyze.parse_args([
        "--info", info, "--acts", acts, "--sae", ns.sae_dir, "--model", ns.model,
        "--sae-id", ns.sae, "--out", f"{out_dir}/features.jsonl.gz",
        "--summary", f"{out_dir}/summary.json", "--chunk-tokens", str(ns.chunk_tokens),
    ])


def one_round(ns: argparse.Namespace, sae, out_dir: str) -> dict[str, float]:
    info = f"{out_dir}/eval.h5"
    t0 = time.perf_counter()
    metrics = evaluate_reconstruction(sae, ns.acts, info, ns.chunk_tokens, {"sae_id": ns.sae})
    t1 = time.perf_counter()
    summary = analyze.run(analysis_args(ns, info, ns.acts, out_dir))
    t2 = time.perf_counter()
    return {"eval_s": t1 - t0, "analysis_total_s": t2 - t1,
            "analysis_s": summary["analysis_seconds"],
            "setup_s": (t2 - t1) - summary["analysis_seconds"],
            "n_tokens": summary["n_tokens"], "fvu": metrics["fvu"],
            "mean_l0": metrics["mean_l0"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="working directory of a finished run")
    p.add_argument("--sae", default="resid6_topk-w2304-k32", help="SAE id under saes/")
    p.add_argument("--acts", default=None,
                   help="activations file (default: the SAE's cfg model/site on news_eval)")
    p.add_argument("--model", default=None, help="model folder (default: resources/models/smollm2)")
    p.add_argument("--chunk-tokens", type=int, default=16384, help="tokens per chunk, as the rule")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/analysis_cpu.json")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    results = Path(ns.results)
    ns.sae_dir = str(results / "saes" / ns.sae)
    cfg = json.loads((results / "saes" / ns.sae / "cfg.json").read_text())
    site = cfg.get("metadata", {}).get("hook_name") or cfg["hook_name"]
    ns.acts = ns.acts or str(results / "acts" / "smollm2" / "news_eval" / f"{site}.h5")
    ns.model = ns.model or str(results / "resources" / "models" / "smollm2")
    sae = load_sae(ns.sae_dir)
    rounds, others0, wall0 = [], cpu_seconds_of_others(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ns.rounds):
            r = one_round(ns, sae, tmp)
            rounds.append(r)
            print(f"round {i}: eval {r['eval_s']:.2f} s, analysis {r['analysis_s']:.2f} s "
                  f"(+ {r['setup_s']:.2f} s set-up) on {r['n_tokens']} tokens", flush=True)
    wall = time.perf_counter() - wall0
    n = rounds[0]["n_tokens"]
    eval_s = statistics.median(r["eval_s"] for r in rounds)
    an_s = statistics.median(r["analysis_s"] for r in rounds)
    an_total = statistics.median(r["analysis_total_s"] for r in rounds)
    record = {
        "benchmark": "feature analysis vs the bare SAE evaluation pass",
        "host": host(), "torch": torch.__version__, "threads": ns.threads,
        "load_average_at_end": os.getloadavg(),
        "other_processes_cpu_share": (cpu_seconds_of_others() - others0) / (wall * (os.cpu_count() or 1)),
        "sae": ns.sae, "acts": ns.acts, "n_tokens": n, "d_sae": cfg["d_sae"],
        "mean_l0": rounds[0]["mean_l0"], "rounds": rounds,
        "eval_tokens_per_s": n / eval_s, "analysis_tokens_per_s": n / an_s,
        "analysis_with_setup_tokens_per_s": n / an_total,
        "ratio": eval_s / an_s, "ratio_with_setup": eval_s / an_total, "goal_ratio": 0.5,
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"eval {record['eval_tokens_per_s']:.0f} tok/s, analysis "
          f"{record['analysis_tokens_per_s']:.0f} tok/s: ratio {record['ratio']:.2f} "
          f"({record['ratio_with_setup']:.2f} with set-up); goal >= 0.5")


if __name__ == "__main__":
    main()
