"""Stage: max-activating examples of an MLSAE per (latent, layer), into the feature database.

``python -m saeflow.mlsae.examples --sae DIR --sae-id ID --acts L0.h5 ... --layers 0 ...
--model M --n-examples 8 --context 4 --db results/features.sqlite --stamp OUT.json``

The original's ``mlsae.analysis.examples``: for every (latent, layer) the ``n`` evaluation
tokens with the largest activation, each with ``context`` tokens either side (within its
sequence) and the latent's activation at that layer on each of them. Its SQLite table
``examples(latent, layer, token_id, token, act, token_ids, tokens, acts)`` becomes the feature
database's ``layer_examples`` (:mod:`saeflow.analysis.store`, SQLite or PostgreSQL) with ``sae``
and ``rank`` added; a load replaces the SAE's rows in one transaction. Ties in activation go to
the earlier token. Two passes over the evaluation activations: the top rows, then the context
activations.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch

from saeflow import h5io
from saeflow.analysis.stats import window_rows
from saeflow.mlsae.math import encode, standardise
from saeflow.mlsae.trainer import LoadedMLSAE, load_mlsae
from saeflow.topk import TopKCodes


class Examples(NamedTuple):
    """The selected (layer, latent, row) triples, grouped by (layer, latent), best first."""

    layer: np.ndarray
    latent: np.ndarray
    row: np.ndarray
    act: np.ndarray
    rank: np.ndarray


class TopPerGroup:
    """Streaming top ``n`` activations per key (``layer * m + latent``), ties to the lower row."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.key = np.zeros(0, np.int64)
        self.act = np.zeros(0, np.float32)
        self.row = np.zeros(0, np.int64)

    def update(self, key: np.ndarray, act: np.ndarray, row: np.ndarray) -> None:
        key = np.concatenate([self.key, key])
        act = np.concatenate([self.act, act.astype(np.float32)])
        row = np.concatenate([self.row, row])
        order = np.lexsort((row, -act, key))
        key, act, row = key[order], act[order], row[order]
        rank = _rank_in_group(key)
        keep = rank < self.n
        self.key, self.act, self.row = key[keep], act[keep], row[keep]

    def result(self, m: int) -> Examples:
        return Examples(self.key // m, self.key % m, self.row, self.act, _rank_in_group(self.key))


def _rank_in_group(sorted_key: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal keys (``sorted_key`` grouped)."""
    pos = np.arange(len(sorted_key))
    start = np.ones(len(sorted_key), bool)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    return pos - np.maximum.accumulate(np.where(start, pos, 0))


def _codes(sae: LoadedMLSAE, x: torch.Tensor) -> TopKCodes:
    with torch.inference_mode():
        return encode(sae.params, standardise(x).x if sae.standardise else x, sae.k)


def _chunks(acts: list[h5py.Dataset], chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    n = min(a.shape[0] for a in acts)
    for start in range(0, n, chunk):
        yield start, torch.stack([torch.from_numpy(a[start : start + chunk]) for a in acts])


def find_examples(sae: LoadedMLSAE, acts: list[h5py.Dataset], n_examples: int, context: int,
                  seq_len: int, chunk: int = 256) -> tuple[Examples, np.ndarray, np.ndarray]:
    """The examples, their window rows (E, 2 context + 1; -1 outside the sequence) and the
    latent's activation at its layer on each window row (E, 2 context + 1)."""
    m = sae.params.W_dec.shape[0]
    top = TopPerGroup(n_examples)
    for start, x in _chunks(acts, chunk):
        codes = _codes(sae, x)  # (L, T, k)
        vals, idx = codes.values.numpy(), codes.indices.numpy().astype(np.int64)
        n_layers, t, _ = idx.shape
        layer = np.broadcast_to(np.arange(n_layers)[:, None, None], idx.shape)
        row = np.broadcast_to(start + np.arange(t)[None, :, None], idx.shape)
        on = vals > 0
        top.update((layer * m + idx)[on], vals[on], row[on])
    ex = top.result(m)
    windows = window_rows(ex.row, seq_len, context, context)
    n_rows = min(a.shape[0] for a in acts)
    # pass 2: the activation of each example's latent at its layer on its window rows
    want = np.where(windows >= 0, (ex.layer[:, None] * n_rows + windows) * m
                    + ex.latent[:, None], -1).ravel()
    unique, inverse = np.unique(want, return_inverse=True)  # -1 (padding) sorts first
    found = np.zeros(len(unique), np.float32)
    for start, x in _chunks(acts, chunk):
        codes = _codes(sae, x)
        vals, idx = codes.values.numpy(), codes.indices.numpy().astype(np.int64)
        n_layers, t, _ = idx.shape
        layer = np.arange(n_layers)[:, None, None]
        row = start + np.arange(t)[None, :, None]
        keys = ((layer * n_rows + row) * m + idx).ravel()
        pos = np.minimum(np.searchsorted(unique, keys), len(unique) - 1)
        hit = unique[pos] == keys  # a (layer, row, latent) occurs once among the codes
        found[pos[hit]] = vals.ravel()[hit]
    window_acts = np.where(want >= 0, found[inverse.ravel()], 0.0)
    return ex, windows, window_acts.reshape(windows.shape)


def example_rows(ex: Examples, windows: np.ndarray, window_acts: np.ndarray,
                 tokens: np.ndarray, layers: list[int], decode: Any) -> list[dict]:
    """Rows of ``layer_examples`` (model layer numbers, decoded tokens; padding dropped)."""
    rows = []
    for e in range(len(ex.row)):
        valid = windows[e] >= 0
        ids = tokens[windows[e][valid]].tolist()
        rows.append({"idx": int(ex.latent[e]), "layer": layers[int(ex.layer[e])],
                     "rank": int(ex.rank[e]), "act": float(ex.act[e]),
                     "token_id": int(tokens[ex.row[e]]), "token": decode(int(tokens[ex.row[e]])),
                     "token_ids": ids, "tokens": [decode(i) for i in ids],
                     "acts": [float(a) for a in window_acts[e][valid]]})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.mlsae.examples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="MLSAE folder")
    p.add_argument("--sae-id", required=True, help="its id in the database")
    p.add_argument("--acts", nargs="+", required=True, help="evaluation activations per layer")
    p.add_argument("--layers", nargs="+", type=int, required=True, help="their layers")
    p.add_argument("--model", required=True, help="model folder or id (its tokenizer)")
    p.add_argument("--n-examples", type=int, default=32, help="per (latent, layer)")
    p.add_argument("--context", type=int, default=4, help="tokens either side")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk")
    p.add_argument("--db", required=True, help="SQLite path or postgresql:// URL")
    p.add_argument("--stamp", required=True, help="JSON written after the commit")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sae = load_mlsae(args.sae)
    if sae.layers != args.layers:
        raise SystemExit(f"{args.sae}: trained on layers {sae.layers}, asked for {args.layers}")
    with ExitStack() as stack:
        files = [stack.enter_context(h5io.open_checked(path, datasets={"acts": (None, None),
                                                                       "tokens": (None,)}))
                 for path in args.acts]
        attrs = files[0].attrs
        seq_len = int(attrs["ctx_len"]) - int(attrs["skip_positions"])  # type: ignore[arg-type]
        tokens = np.asarray(files[0]["tokens"][:])  # type: ignore[index]
        acts: list[h5py.Dataset] = [f["acts"] for f in files]  # type: ignore[misc]
        ex, windows, window_acts = find_examples(sae, acts, args.n_examples, args.context,
                                                 seq_len, args.chunk_tokens)
    from saeflow.analysis.store import open_store
    from saeflow.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = str(tokenizer.decode([i]))
        return cache[i]

    rows = example_rows(ex, windows, window_acts, tokens, args.layers, decode)
    store = open_store(args.db)
    try:
        summary = {"sae_id": args.sae_id, "d_sae": int(sae.params.W_dec.shape[0]),
                   "d_in": int(sae.params.W_dec.shape[1]), "k": sae.k, "layers": sae.layers,
                   "sae_path": args.sae, "model_path": args.model,
                   "n_examples": args.n_examples, "context": args.context}
        n = store.load_layer_examples(args.sae_id, rows, summary)
    finally:
        store.close()
    h5io.write_json(args.stamp, {"sae_id": args.sae_id, "examples": n,
                                 "latent_layers": len(np.unique(ex.layer * 10**9
                                                                    + ex.latent)),
                                 "n_examples": args.n_examples, "context": args.context})
    print(f"{n} examples of {args.sae_id} loaded into {args.db}")


if __name__ == "__main__":
    main()
