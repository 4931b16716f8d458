"""The MLSAE as pure functions (tensors in, tensors out).

An MLSAE is one TopK SAE whose inputs are the residual streams of a range of layers, each
(layer, token) pair a separate input row of the same dictionary (``mlsae/model/autoencoder.py:
MLSAE`` of tim-lawson/mlsae; its input is ``[layer, batch, pos, d_model]`` with TopK per row)::

    x_s   = (x - mean(x)) / (std(x) + eps)          # per row, over d_model (standardisation)
    z     = relu(topk((x_s - b) @ W_enc, k))        # b: pre-encoder bias, no encoder bias
    x_hat = (z @ W_dec + b) * (std + eps) + mean    # de-standardised reconstruction

The original de-standardises with ``std`` instead of ``std + eps``, so its round trip is not
the identity; here both directions use ``std + eps`` and the round trip is exact up to rounding.

The training loss is the original's: the mean over layers of each layer's FVU in standardised
space, plus ``auxk_coef`` times the AuxK loss of the dead latents (``metrics/auxiliary_loss.py``:
MSE(e, e_aux) / Var(e), with e the standardised residual). Gradients are written by hand with
saeflow's sparse TopK backward (:mod:`saeflow.topk`): the only change from a single-layer TopK
SAE is that each row's error is weighted by ``1 / (n_layers * V_layer)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow.topk import TopKCodes, TopKParams, _auxk_dense, _sparse_backward, topk_rows

STD_EPS = 1e-5
"""The original's ``standardize`` epsilon."""


class Standardised(NamedTuple):
    """Rows standardised over their last dimension, and what undoes it."""

    x: Tensor
    """(..., d) standardised rows: zero mean, unit std (times std / (std + eps))."""
    mean: Tensor
    """(..., 1) row means."""
    scale: Tensor
    """(..., 1) row std (unbiased, as torch.std) + eps."""


def standardise(x: Tensor, eps: float = STD_EPS) -> Standardised:
    """Per-row standardisation over d (``x`` (..., d)); :func:`destandardise` inverts it."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    scale = centred.std(dim=-1, keepdim=True) + eps
    return Standardised(centred / scale, mean, scale)


def destandardise(y: Tensor, stats: Standardised) -> Tensor:
    """Map standardised rows ``y`` (..., d) back with the stats of the rows they came from."""
    return y * stats.scale + stats.mean


class MLSAEStep(NamedTuple):
    """What :func:`loss_and_grads` computes for one batch of ``n_layers`` x ``B`` rows."""

    grads: TopKParams
    """dL/dparams (b_enc's gradient is zero: the MLSAE has no encoder bias)."""
    loss: Tensor
    """Scalar total loss: mean layer FVU + auxk_coef * auxk_loss."""
    layer_fvu: Tensor
    """(n_layers,) FVU of each layer (standardised space)."""
    auxk_loss: Tensor
    """Scalar AuxK loss (auxk_coef not included)."""
    codes: TopKCodes
    """(n_layers * B, k) codes, layer-major rows."""


def encode(params: TopKParams, x_s: Tensor, k: int) -> TopKCodes:
    """TopK codes of standardised rows ``x_s`` (..., d)."""
    pre = (x_s - params.b_dec) @ params.W_enc + params.b_enc
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return TopKCodes(values.relu(), indices)


def decode(params: TopKParams, codes: TopKCodes) -> Tensor:
    """Standardised reconstruction (..., d) of codes (..., k)."""
    lead, k = codes.indices.shape[:-1], codes.indices.shape[-1]
    out = F.embedding_bag(codes.indices.reshape(-1, k), params.W_dec, mode="sum",
                          per_sample_weights=codes.values.reshape(-1, k).to(params.W_dec.dtype))
    return (out + params.b_dec).reshape(*lead, -1)


def reconstruct(params: TopKParams, x: Tensor, k: int) -> tuple[Tensor, TopKCodes]:
    """De-standardised reconstruction of raw rows ``x`` (..., d), and their codes."""
    stats = standardise(x)
    codes = encode(params, stats.x, k)
    return destandardise(decode(params, codes), stats), codes


def layer_variance(x: Tensor) -> Tensor:
    """Total variance sum_t |x_lt - mean_l|^2 of each layer of ``x`` (L, B, d) -> (L,)."""
    return (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))


def layer_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """FVU of each layer, float64: ``x``, ``x_hat`` (L, B, d) -> (L,)."""
    x64 = x.double()
    return (x_hat.double() - x64).pow(2).sum(dim=(1, 2)) / layer_variance(x64)


def loss_and_grads(
    params: TopKParams,
    x_s: Tensor,
    k: int,
    *,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    auxk_coef: float = 1 / 32,
) -> MLSAEStep:
    """Loss of standardised rows ``x_s`` (L, B, d) and its exact gradient (module docstring)."""
    n_layers, batch, d = x_s.shape
    x = x_s.reshape(-1, d)
    xc = x - params.b_dec
    pre = torch.addmm(params.b_enc, xc, params.W_enc)  # (L*B, m), the dense GEMM
    vals, idx = topk_rows(pre, k)
    acts = vals.relu()
    err = F.embedding_bag(idx, params.W_dec, per_sample_weights=acts, mode="sum")
    err = err.add_(params.b_dec).sub_(x)  # x_hat - x, (L*B, d)
    tiny = torch.finfo(x.dtype).tiny
    var = layer_variance(x_s).clamp_min(tiny)  # (L,)
    sq = err.view(n_layers, batch, d).pow(2).sum(dim=(1, 2))
    fvu = sq / var
    # d/dx_hat of mean_l |err_l|^2 / V_l: each row weighted by its layer's 1 / (L V_l)
    row_w = (2.0 / (n_layers * var)).repeat_interleave(batch).unsqueeze(1)
    d_recon = err * row_w
    grads = _sparse_backward(params, xc, d_recon, vals, idx, acts, None)
    auxk = fvu.new_zeros(())
    if dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
        # the original normalises AuxK by the variance of its target, e = x - x_hat
        var_e = (err - err.mean(0)).pow(2).sum().clamp_min(tiny)
        auxk = _auxk_dense(params, xc, err, pre, dead_mask, k_aux, auxk_coef, var_e, grads)
    torch.addmv(d_recon.sum(0), params.W_enc, grads.b_enc, alpha=-1.0, out=grads.b_dec)
    grads.b_enc.zero_()  # no encoder bias: keep it at its initial zero
    return MLSAEStep(grads, fvu.mean() + auxk_coef * auxk, fvu, auxk, TopKCodes(acts, idx))


# ====================================================================== layer statistics
def layer_dists(codes: TopKCodes, n_layers: int, n_latents: int) -> tuple[Tensor, Tensor]:
    """Per (layer, latent) firing counts and activation totals, float64 (L, m) each.

    ``codes`` are (L, T, k) (layer-major). Only positive activations count: the original's
    ``analysis/dists.py`` also counted top-k slots whose value ReLU had set to zero.
    """
    counts = torch.zeros(n_layers, n_latents, dtype=torch.float64)
    totals = torch.zeros_like(counts)
    values = codes.values.reshape(n_layers, -1).double()
    indices = codes.indices.reshape(n_layers, -1)
    counts.scatter_add_(1, indices, (values > 0).double())
    totals.scatter_add_(1, indices, values)
    return counts, totals


class LayerDists(NamedTuple):
    """Each latent's distribution over layers (``analysis/dists.py: Dists``), (m,) or (L, m)."""

    probs: Tensor
    """(L, m) share of the latent's total activation at each layer (NaN if it never fired)."""
    layer_mean: Tensor
    """(m,) expected layer index under ``probs``."""
    layer_var: Tensor
    """(m,) variance of the layer index under ``probs``."""
    layer_std: Tensor
    """(m,) its square root."""


def summarise_dists(totals: Tensor) -> LayerDists:
    """Layer distributions from activation totals (L, m)."""
    probs = totals / totals.sum(0)
    layers = torch.arange(totals.shape[0], dtype=totals.dtype).unsqueeze(1)
    mean = (probs * layers).sum(0)
    var = ((probs * layers**2).sum(0) - mean**2).clamp_min(0.0)
    return LayerDists(probs, mean, var, var.sqrt())


def _layer_var(probs: Tensor) -> Tensor:
    """Variance of the layer index under distributions over dim 0 of ``probs`` (L, ...)."""
    layers = torch.arange(probs.shape[0], dtype=probs.dtype)
    layers = layers.view(-1, *([1] * (probs.dim() - 1)))
    mean = (layers * probs).sum(0)
    return (layers**2 * probs).sum(0) - mean**2


class VarianceTerms(NamedTuple):
    """The variance decomposition of ``analysis/variances.py`` for one batch of tokens."""

    exp_var_l_f: float
    """Mean over latents of the layer variance of the latent's token-aggregated distribution."""
    exp_var_l_tf: float
    """Mean over (token, latent) of the layer variance within a single token."""
    var_l: float
    """Layer variance of the distribution aggregated over tokens and latents."""
    rel_var_f: float
    """exp_var_l_f / var_l."""
    rel_var_t: float
    """exp_var_l_tf / exp_var_l_f: the headline ratio is its inverse (aggregated / per-token)."""


def variance_terms(latents: Tensor) -> VarianceTerms:
    """The original's variance terms of dense latents (L, T, m), in float64.

    Per (token, latent) the activations are normalised over layers (0 where the latent never
    fires on the token), exactly as the original's ``Metric.update``.
    """
    lat = latents.double()
    probs = (lat / lat.sum(0)).nan_to_num_(0.0)
    e_f = float(_layer_var(probs.mean(1)).mean())
    e_tf = float(_layer_var(probs).mean())
    var_l = float(_layer_var(probs.mean((1, 2))))
    return VarianceTerms(e_f, e_tf, var_l, e_f / var_l, e_tf / e_f)


def dense_codes(codes: TopKCodes, n_latents: int) -> Tensor:
    """Dense (..., m) activations of codes (..., k)."""
    dense = codes.values.new_zeros(*codes.values.shape[:-1], n_latents)
    return dense.scatter_(-1, codes.indices, codes.values)


# ====================================================================== similarities
def mmcs(a: Tensor, b: Tensor, chunk: int = 1024) -> tuple[float, Tensor]:
    """Mean max cosine similarity of the rows of ``a`` (m, d) to the rows of ``b`` (n, d).

    Chunked over the rows of ``a`` (the original's ``figures/mmcs.py`` chunks by 1024 for
    large dictionaries) so memory is (chunk, n). Returns (MMCS, each row's max (m,)).
    """
    bn = F.normalize(b.float(), dim=1)
    best = []
    for start in range(0, a.shape[0], chunk):
        an = F.normalize(a[start : start + chunk].float(), dim=1)
        best.append((an @ bn.T).max(dim=1).values)
    per_row = torch.cat(best)
    return float(per_row.double().mean()), per_row


def adjacent_cosine(x: Tensor) -> Tensor:
    """Mean cosine similarity of centred residuals at adjacent layers: (L, T, d) -> (L-1,).

    Each layer is centred by its mean over tokens first (``figures/resid_cos_sim.py``).
    """
    xc = x.double() - x.double().mean(dim=1, keepdim=True)
    return F.cosine_similarity(xc[:-1], xc[1:], dim=-1).mean(dim=1)


def max_cosine_to(W_dec: Tensor, embed: Tensor, chunk: int = 1024) -> Tensor:
    """Each decoder row's (m, d) max cosine similarity to the rows of ``embed`` (V, d) -> (m,)."""
    return mmcs(W_dec, embed, chunk)[1]
