"""Stage: the MLSAE similarity analyses (MMCS, residual and embedding cosine similarities).

``python -m saeflow.mlsae.similarity --saes ID=DIR ... --acts L0.h5 ... --layers 0 ...
--model M --mmcs OUT.csv --resid OUT.csv --embed OUT.csv --embed-latents OUT.csv``

- ``--mmcs`` (the original's ``figures/mmcs.py``, extended to pairs): for every ordered pair of
  dictionaries (a, b), the mean over a's latents of the largest cosine similarity of its decoder
  row to b's rows; a == b excludes the latent itself (the original took, for latent j, the max
  over latents i < j only, so its first latent had no partner and each pair counted once). Rows
  hold mean, var, std and sem, chunked over a's rows so memory is (chunk, n_b).
- ``--resid`` (``figures/resid_cos_sim.py``): per adjacent layer pair (l, l+1) of the evaluation
  activations, mean / var / std / sem over tokens of the cosine similarity of the residuals,
  centred by each layer's token mean (``cos_sim``) and raw (``cos_sim_raw``, the original's
  first version), and each layer's mean residual L2 norm (``resid_l2_norm_*.csv``).
- ``--embed`` / ``--embed-latents`` (``figures/embed_cos_sim.py``): each latent's largest cosine
  similarity of its decoder row to the input embeddings (``in``) and to the unembeddings (``out``)
  with the token that attains it; summary per SAE (mean, var, std, sem of each).

:func:`pair_histogram` (the dists cos-sim heatmap of :mod:`saeflow.figures.mlsae`) lives here
too, beside :func:`max_cosine`, so that :mod:`saeflow.mlsae.math` (which the training rule's
code version covers) is unchanged by the analyses.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from contextlib import ExitStack
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow import h5io
from saeflow.mlsae.trainer import load_mlsae


class MaxCosine(NamedTuple):
    """Each row's largest cosine similarity to a set of rows, and which row attains it."""

    values: Tensor
    """(m,) float32."""
    indices: Tensor
    """(m,) int64."""


def max_cosine(a: Tensor, b: Tensor, chunk: int = 1024, exclude_self: bool = False) -> MaxCosine:
    """Largest cosine similarity of each row of ``a`` (m, d) to the rows of ``b`` (n, d).

    Chunked over the rows of ``a`` (the original's ``figures/mmcs.py`` chunks by 1024 for
    large dictionaries) so memory is (chunk, n). ``exclude_self`` (``a`` is ``b``): row i is
    not compared with itself.
    """
    if exclude_self and a.shape[0] < 2:
        raise ValueError(f"exclude_self needs two rows or more, got {a.shape[0]}")
    bn = F.normalize(b.float(), dim=1)
    values, indices = [], []
    for start in range(0, a.shape[0], chunk):
        sims = F.normalize(a[start : start + chunk].float(), dim=1) @ bn.T
        if exclude_self:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -torch.inf
        best = sims.max(dim=1)
        values.append(best.values)
        indices.append(best.indices)
    return MaxCosine(torch.cat(values), torch.cat(indices))


def pair_histogram(W_dec: Tensor, layer_mean: Tensor, bins: tuple[int, int] = (64, 512),
                   x_range: tuple[float, float] = (0.0, 5.0),
                   y_range: tuple[float, float] = (-0.25, 0.25), chunk: int = 1024) -> Tensor:
    """2-D histogram over latent pairs i < j of (|layer_mean_i - layer_mean_j|, cosine of their
    decoder rows): the original's ``figures/dists_cos_sim_heatmaps.py`` (64 x 512 bins over
    [0, 5] x [-0.25, 0.25]). Pairs outside the ranges are dropped, like ``hist2d``; bins are
    half-open except the last, which includes its upper edge (numpy's rule). Chunked over rows.

    The original sorted the decoder by mean layer but not the mean layers themselves, so its
    differences paired the wrong latents; here both come from the same latent. Returns float64
    counts (bins[0], bins[1]).
    """
    wn = F.normalize(W_dec.double(), dim=1)
    mean = layer_mean.double()
    counts = torch.zeros(bins[0] * bins[1], dtype=torch.float64)
    m = wn.shape[0]
    for start in range(0, m, chunk):
        rows = torch.arange(start, min(start + chunk, m))
        cos = wn[rows] @ wn.T
        dx = (mean[rows].unsqueeze(1) - mean.unsqueeze(0)).abs()
        upper = rows.unsqueeze(1) < torch.arange(m).unsqueeze(0)  # pairs i < j only
        ix = _bin(dx, bins[0], x_range)
        iy = _bin(cos, bins[1], y_range)
        keep = upper & (ix >= 0) & (iy >= 0)
        counts += torch.bincount((ix * bins[1] + iy)[keep], minlength=counts.numel()).double()
    return counts.view(bins)


def _bin(x: Tensor, n: int, bounds: tuple[float, float]) -> Tensor:
    """Bin index of each value in ``n`` equal bins over ``bounds`` (-1 outside)."""
    lo, hi = bounds
    idx = torch.floor((x - lo) / (hi - lo) * n).long()
    idx = torch.where(x == hi, n - 1, idx)
    return torch.where((x >= lo) & (x <= hi), idx, -1)


def _moments(x: Tensor) -> dict[str, float]:
    """mean, var, std, sem of ``x`` (unbiased var, as the original's ``Tensor.var``)."""
    x = x.double()
    var = float(x.var()) if x.numel() > 1 else 0.0
    return {"mean": float(x.mean()), "var": var, "std": math.sqrt(var),
            "sem": math.sqrt(var) / math.sqrt(x.numel())}


def mmcs_table(decoders: dict[str, Tensor], chunk: int = 1024) -> pd.DataFrame:
    """MMCS of every ordered pair of decoders (id -> (m, d)), self-pairs without the diagonal."""
    rows = []
    for a, wa in decoders.items():
        for b, wb in decoders.items():
            best = max_cosine(wa, wb, chunk, exclude_self=a == b)
            rows.append({"sae_a": a, "sae_b": b, "n_latents_a": wa.shape[0],
                         "n_latents_b": wb.shape[0], **_moments(best.values)})
    return pd.DataFrame(rows)


def resid_cos_sim(paths: list[str], layers: list[int], chunk: int = 4096) -> pd.DataFrame:
    """Adjacent-layer cosine similarities of the residuals in ``paths`` (one file per layer).

    Two passes over the files: the per-layer token means (float64), then the cosine
    similarities of the centred and raw residuals, accumulated as float64 sums.
    """
    if len(paths) != len(layers) or len(paths) < 2:
        raise ValueError(f"need one file per layer and two layers or more, got {len(paths)} "
                         f"files for layers {layers}")
    with ExitStack() as stack:
        acts: list[h5py.Dataset] = [
            stack.enter_context(h5io.open_checked(p, datasets={"acts": (None, None)}))["acts"]
            for p in paths]  # type: ignore[misc]
        n = min(a.shape[0] for a in acts)
        d = acts[0].shape[1]
        mean = torch.zeros(len(paths), d, dtype=torch.float64)
        for start in range(0, n, chunk):
            for i, a in enumerate(acts):
                mean[i] += torch.from_numpy(a[start : start + chunk]).double().sum(0)
        mean /= n
        keys = ("c", "c2", "r", "r2")
        sums = {key: torch.zeros(len(paths) - 1, dtype=torch.float64) for key in keys}
        norms = torch.zeros(len(paths), dtype=torch.float64)
        for start in range(0, n, chunk):
            x = torch.stack([torch.from_numpy(a[start : start + chunk]).double() for a in acts])
            norms += x.norm(dim=-1).sum(1)
            for name, y in (("c", x - mean.unsqueeze(1)), ("r", x)):
                cos = F.cosine_similarity(y[:-1], y[1:], dim=-1)  # (L-1, T)
                sums[name] += cos.sum(1)
                sums[name + "2"] += cos.pow(2).sum(1)
    rows = []
    for i in range(len(layers) - 1):
        row: dict[str, float | int] = {"layer": layers[i], "next_layer": layers[i + 1],
                                       "n_tokens": n}
        for name, col in (("c", "cos_sim"), ("r", "cos_sim_raw")):
            m = float(sums[name][i]) / n
            var = max(float(sums[name + "2"][i]) - n * m * m, 0.0) / max(n - 1, 1)
            row.update({f"{col}_mean": m, f"{col}_var": var, f"{col}_std": math.sqrt(var),
                        f"{col}_sem": math.sqrt(var / n)})
        row["l2_norm_mean"] = float(norms[i]) / n
        rows.append(row)
    rows.append({"layer": layers[-1], "next_layer": -1, "n_tokens": n,
                 "l2_norm_mean": float(norms[-1]) / n})
    return pd.DataFrame(rows)


def embed_cos_sim(decoders: dict[str, Tensor], embed_in: Tensor, embed_out: Tensor,
                  chunk: int = 1024) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per latent: the largest cosine similarity to the embeddings and to the unembeddings, and
    the token ids attaining them; plus the summary per SAE. Returns (summary, latents)."""
    summary, latents = [], []
    for sae_id, w in decoders.items():
        best_in = max_cosine(w, embed_in, chunk)
        best_out = max_cosine(w, embed_out, chunk)
        latents.append(pd.DataFrame({
            "sae_id": sae_id, "latent": np.arange(w.shape[0]),
            "in_cos_sim": best_in.values.numpy(), "in_token_id": best_in.indices.numpy(),
            "out_cos_sim": best_out.values.numpy(), "out_token_id": best_out.indices.numpy()}))
        row: dict[str, object] = {"sae_id": sae_id, "n_latents": w.shape[0]}
        for side, best in (("in", best_in), ("out", best_out)):
            row.update({f"{side}_{k}": v for k, v in _moments(best.values).items()})
        summary.append(row)
    return pd.DataFrame(summary), pd.concat(latents, ignore_index=True)


def _sae_arg(text: str) -> tuple[str, str]:
    sae_id, sep, path = text.partition("=")
    if not sep or not sae_id or not path:
        raise argparse.ArgumentTypeError(f"--saes '{text}': expected ID=DIR")
    return sae_id, path


def _write(frame: pd.DataFrame, path: str) -> None:
    with h5io.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.mlsae.similarity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saes", type=_sae_arg, nargs="+", required=True, help="ID=DIR per SAE")
    p.add_argument("--acts", nargs="+", required=True, help="evaluation activations per layer")
    p.add_argument("--layers", nargs="+", type=int, required=True, help="their layers")
    p.add_argument("--model", required=True, help="model folder or id (embeddings)")
    p.add_argument("--chunk", type=int, default=1024, help="rows per similarity chunk")
    p.add_argument("--mmcs", required=True, help="output: MMCS per ordered pair")
    p.add_argument("--resid", required=True, help="output: adjacent-layer cosine similarity")
    p.add_argument("--embed", required=True, help="output: embedding similarity per SAE")
    p.add_argument("--embed-latents", required=True, help="output: ... per latent")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    decoders = {sae_id: load_mlsae(path).params.W_dec for sae_id, path in args.saes}
    _write(mmcs_table(decoders, args.chunk), args.mmcs)
    _write(resid_cos_sim(args.acts, args.layers), args.resid)
    from saeflow.models import load_model

    model, _ = load_model(args.model)
    with torch.no_grad():
        embed_in = model.get_input_embeddings().get_parameter("weight").detach().float()
        out = model.get_output_embeddings()
        if out is None:
            raise SystemExit(f"{args.model}: the model has no output embeddings (unembedding)")
        embed_out = out.weight.detach().float()
    summary, latents = embed_cos_sim(decoders, embed_in, embed_out, args.chunk)
    _write(summary, args.embed)
    _write(latents, args.embed_latents)


if __name__ == "__main__":
    main()
