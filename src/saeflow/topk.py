"""TopK sparse autoencoders (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

The model, in SAELens ``TopKSAE`` conventions (``apply_b_dec_to_input=True``,
``rescale_acts_by_decoder_norm=False``)::

    pre   = (x - b_dec) @ W_enc + b_enc         # (B, m)   W_enc (d, m)
    z     = relu(topk(pre, k))                  # k nonzeros per token
    x_hat = z @ W_dec + b_dec                   # (B, d)   W_dec (m, d), unit-norm rows

The loss of a batch is normalised by the batch's total variance ``V = sum_t |x_t - mean(x)|^2``
(sparsify's normalisation, so the main term is the FVU)::

    L = |x_hat - x|^2 / V  +  auxk_coef * scale * |e_aux - (x - x_hat)|^2 / V

where ``e_aux`` decodes (without ``b_dec``) the ``k_aux`` largest pre-activations among *dead*
latents, the AuxK loss of Gao et al. (Appendix A.2; ``k_aux = d_in / 2`` and the scale
``min(n_dead / k_aux, 1)`` follow Appendix B.1 and sparsify).

Speed. A step is the dense encoder GEMM (2·d·m FLOPs per token, the floor) plus work that is
O(k·d) per token, because the backward pass is written by hand (:func:`loss_and_grads`) instead
of going through autograd: an exact row top-k that does not sort whole rows (:func:`topk_rows`);
an ``embedding_bag`` decoder over the k selected rows; the latent gradients as a sampled
dense-dense product (``torch.sparse.sampled_addmm``); ``dW_dec`` and ``dW_enc`` as CSR
sparse-dense products over the selected (token, latent) pairs, written into persistent gradient
buffers; and ``b_dec``'s gradient through the encoder input as one GEMV: with ``xc = x - b_dec``,
``sum_t dL/dxc_t = W_enc @ sum_t dL/dpre_t = W_enc @ db_enc``, so
``db_dec = sum_t dL/dx_hat_t - W_enc @ db_enc``. Nothing (B, m) is written besides the
pre-activations; AuxK works on the dead latents' columns only. Adam is torch's fused kernel.

Llama Scope's recipe (OpenMOSS Language-Model-SAEs; TopKTrainConfig documents each option):
decoder-norm-aware selection (top k of ``relu(pre_j) |W_dec[j]|``, free decoder norms), dataset-
wise activation normalisation (train on ``c x`` with E|c x| = sqrt(d)), a k warm-up from
``initial_k``, an LR cool-down to ``lr * lr_end_ratio``, global gradient-norm clipping, Adam
betas. :func:`fold_params` folds c and the decoder norms into the saved weights, so the saved
SAE is a plain TopK SAE on raw activations; ``save_as="jumprelu"`` converts it to a SAELens
JumpReLU SAE with one threshold (:func:`jumprelu_threshold`).

Files: :func:`train_topk` writes the SAELens on-disk layout (``cfg.json`` +
``sae_weights.safetensors``), so ``sae_lens.SAE.load_from_disk`` gives a ``TopKSAE`` whose
``encode`` equals :func:`encode`; :func:`load_topk` reads it back (and other SAELens TopK folders).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saeflow import __version__
from saeflow.batches import ActivationBatches
from saeflow.h5io import InputFileError, atomic_path

SELECTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``TopKTrainConfig.selection_dtype`` -> the dtype of the selection GEMM."""
CHECKPOINT_FILE = "topk_checkpoint.pt"
CHECKPOINT_FORMAT = 1
LOG_COLUMNS: tuple[str, ...] = (
    "step", "tokens", "loss", "fvu", "auxk_loss", "l0", "dead_fraction", "lr", "tokens_per_s"
)  # fmt: skip


# ====================================================================== configuration
@dataclass
class TopKTrainConfig:
    """Hyper-parameters of one TopK SAE training run (all of it goes into cfg.json)."""

    d_in: int
    """Width of the activations (the model's d_model at the hooked site)."""
    d_sae: int
    """Number of latents m (dictionary size)."""
    k: int
    """Active latents per token."""
    total_tokens: int
    """Training length in tokens; the run takes ceil(total_tokens / batch_size) steps."""
    lr: float | None = None
    """Adam learning rate. None: 2e-4 / sqrt(d_sae / 2**14), the scaling law of Gao et al. that
    sparsify uses."""
    batch_size: int = 4096
    """Tokens per optimisation step."""
    seed: int = 0
    """Seeds the weight initialisation and the order of the activation batches."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024, Appendix A.2)."""
    k_aux: int | None = None
    """Dead latents the AuxK loss uses per token. None: d_in // 2 (Gao et al., Appendix B.1)."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for more than this many tokens is dead (Gao et al.: 10M)."""
    lr_warmup_steps: int = 1000
    """Linear learning-rate warm-up from 0 (sparsify's default); constant afterwards."""
    checkpoint_every_steps: int = 1000
    """Write a resumable checkpoint every this many steps."""
    log_every_steps: int = 50
    """Write a CSV log row (means over the interval) every this many steps and at the end."""
    buffer_tokens: int | None = None
    """Shuffle-buffer size of the activation stream (None: ActivationBatches' default)."""
    hook_name: str | None = None
    """Model site the activations come from (SAELens metadata.hook_name)."""
    model_name: str | None = None
    """Model the activations come from (SAELens metadata.model_name)."""
    dataset: str | None = None
    """Corpus the activations come from (SAELens metadata.dataset_path)."""
    device: str = "cpu"
    """Torch device to train on (the saved SAE is always float32 on cpu)."""
    # ---- Llama Scope's recipe (OpenMOSS Language-Model-SAEs; docs/reference section 2). The
    # defaults leave each piece off, so a plain TopK family trains as before.
    decoder_norm_topk: bool = False
    """Llama Scope's decoder-norm-aware TopK (``sparsity_include_decoder_norm``): select the k
    largest ``relu(pre_j) * |W_dec[j]|`` instead of ``pre_j``; the decoder rows are then free
    (no unit-norm constraint, no gradient projection). At save time the norms are folded into
    the encoder, so the saved SAE is a plain TopK SAE with unit decoder rows."""
    decoder_init_norm: float = 1.0
    """Norm of the initial decoder rows (Llama Scope ``fix_norm=0.5``); only with
    decoder_norm_topk (otherwise the rows are renormalised to 1 after every step)."""
    activation_norm: str = "none"
    """``dataset_wise``: scale the activations by one constant c so that E|c x| = sqrt(d_in)
    (Llama Scope ``norm_activation="dataset-wise"``; c estimated on the first batch), and fold c
    into the weights at save time (``fold_activation_scale``): the saved SAE takes raw
    activations. ``none``: train on the raw activations."""
    initial_k: int | None = None
    """Llama Scope's k warm-up: start at ``initial_k`` (>= k) and lower it to k over
    ``k_warmup_steps`` (``max(k, ceil(k_t))``). None: k throughout."""
    k_warmup_steps: int = 0
    """Steps of the k warm-up from initial_k down to k."""
    k_schedule: str = "linear"
    """``linear`` or ``exponential`` (k_t = k0 - (k0 - k) (1 - e^{-f p}) / (1 - e^{-f}), p the
    warm-up progress, f = k_exponential_factor), Llama Scope's ``k_schedule_type``."""
    k_exponential_factor: float = 3.0
    """f of the exponential k schedule (Llama Scope default 3.0)."""
    lr_cooldown_steps: int = 0
    """Llama Scope's cool-down (``constantwithwarmup``): over the last steps the LR falls
    linearly to ``lr * lr_end_ratio``. 0: no cool-down (the LR stays constant after warm-up)."""
    lr_end_ratio: float = 1 / 32
    """Final LR as a fraction of lr at the end of the cool-down (Llama Scope: 1/32 default,
    0.01 in the Llama Scope run)."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value (Llama Scope: 0.001 in its run); 0: off."""
    adam_beta1: float = 0.9
    """Adam beta1 (Llama Scope: 0.9)."""
    adam_beta2: float = 0.999
    """Adam beta2 (Llama Scope run: 0.9999)."""
    selection_dtype: str = "float32"
    """``bfloat16``: the dense encoder GEMM, whose only use is choosing each token's k latents,
    runs in bfloat16 (about 2x the float32 GEMM rate on an AVX512-BF16 CPU: 377 vs 192
    GFLOP/s); the k chosen pre-activations are then recomputed in float32, so the loss and
    every gradient are exact float32 for the chosen set. Only near-ties at the k-th value (within bf16's 2^-8 relative
    rounding) may choose a different, equally large latent. ``float32``: everything float32."""
    save_as: str = "topk"
    """``jumprelu``: save the trained TopK SAE as a SAELens JumpReLU SAE (Llama Scope's
    ``topk_to_jumprelu_conversion``): one threshold for every latent, the (k * B)-th largest
    ReLU'd pre-activation over one batch of B tokens drawn after training."""

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 2e-4 / math.sqrt(self.d_sae / 2**14)
        if self.k_aux is None:
            self.k_aux = self.d_in // 2
        for name in ("d_in", "d_sae", "k", "total_tokens", "batch_size", "k_aux"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TopKTrainConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.k > self.d_sae:
            raise ValueError(f"TopKTrainConfig.k ({self.k}) exceeds d_sae ({self.d_sae})")
        for name in ("lr_warmup_steps", "dead_tokens_threshold", "auxk_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"TopKTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("checkpoint_every_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TopKTrainConfig.{name} must be positive, got {getattr(self, name)}"
                )
        for name, allowed in (
            ("activation_norm", ("none", "dataset_wise")),
            ("k_schedule", ("linear", "exponential")),
            ("save_as", ("topk", "jumprelu")),
            ("selection_dtype", ("float32", "bfloat16")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TopKTrainConfig.{name} is {getattr(self, name)!r}, expected one of {allowed}"
                )
        for name in ("k_warmup_steps", "lr_cooldown_steps", "clip_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"TopKTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.initial_k is not None and not self.k <= self.initial_k <= self.d_sae:
            raise ValueError(
                f"TopKTrainConfig.initial_k ({self.initial_k}) must lie in [k, d_sae] = "
                f"[{self.k}, {self.d_sae}]"
            )
        if not 0 <= self.lr_end_ratio <= 1:
            raise ValueError(
                f"TopKTrainConfig.lr_end_ratio must be in [0, 1], got {self.lr_end_ratio}"
            )
        if not self.decoder_init_norm > 0:
            raise ValueError(
                f"TopKTrainConfig.decoder_init_norm must be positive, got {self.decoder_init_norm}"
            )
        if self.decoder_init_norm != 1.0 and not self.decoder_norm_topk:
            raise ValueError(
                f"TopKTrainConfig.decoder_init_norm is {self.decoder_init_norm}, but the decoder "
                "rows are kept at norm 1 unless decoder_norm_topk is true"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(
                    f"TopKTrainConfig.{name} must be in [0, 1), got {getattr(self, name)}"
                )

    @property
    def total_steps(self) -> int:
        return -(-self.total_tokens // self.batch_size)


# ====================================================================== pure math
class TopKParams(NamedTuple):
    """SAE weights in SAELens layout. ``W_enc`` may be a transposed view of ``(m, d)`` storage."""

    W_enc: Tensor
    """(d_in, d_sae) encoder."""
    b_enc: Tensor
    """(d_sae,) encoder bias."""
    W_dec: Tensor
    """(d_sae, d_in) decoder; rows are unit norm during training."""
    b_dec: Tensor
    """(d_in,) decoder bias, also subtracted from the input."""


class TopKCodes(NamedTuple):
    """Sparse codes: k (value, latent) pairs per token."""

    values: Tensor
    """(..., k) latent activations, >= 0."""
    indices: Tensor
    """(..., k) latent ids, int64."""


class StepResult(NamedTuple):
    """What :func:`loss_and_grads` computes for one batch."""

    grads: TopKParams
    """dL/dparams, laid out like the params (``W_enc`` as a transposed view of (m, d))."""
    loss: Tensor
    """Scalar total loss: fvu + auxk_coef * auxk_loss."""
    fvu: Tensor
    """Scalar fraction of variance unexplained (the main loss term)."""
    auxk_loss: Tensor
    """Scalar AuxK loss (scale included, auxk_coef not); 0 when no latent is dead."""
    codes: TopKCodes
    """The batch's codes (B, k), for firing statistics."""


def encode(params: TopKParams, x: Tensor, k: int, decoder_norm_aware: bool = False) -> TopKCodes:
    """TopK codes of ``x`` (..., d_in); the same arithmetic as SAELens ``TopKSAE.encode``.

    ``decoder_norm_aware``: select the k largest ``pre_j * |W_dec[j]|`` (Llama Scope); the codes
    keep the values ``relu(pre_j)``.
    """
    pre = (x - params.b_dec) @ params.W_enc + params.b_enc  # (..., m)
    if not decoder_norm_aware:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return TopKCodes(values.relu(), indices)
    indices = (pre * decoder_norms(params)).topk(k, dim=-1, sorted=False).indices
    return TopKCodes(pre.gather(-1, indices).relu(), indices)


def decoder_norms(params: TopKParams) -> Tensor:
    """(d_sae,) norms of the decoder rows."""
    return torch.linalg.vector_norm(params.W_dec, dim=1)


def decode(params: TopKParams, codes: TopKCodes) -> Tensor:
    """Reconstruction (..., d_in) of sparse codes."""
    lead = codes.indices.shape[:-1]
    k = codes.indices.shape[-1]
    out = F.embedding_bag(
        codes.indices.reshape(-1, k),
        params.W_dec,
        per_sample_weights=codes.values.reshape(-1, k).to(params.W_dec.dtype),
        mode="sum",
    )
    return (out + params.b_dec).reshape(*lead, -1)


def codes_to_dense(codes: TopKCodes, d_sae: int) -> Tensor:
    """Dense (..., d_sae) activations, as SAELens ``encode`` returns them."""
    dense = codes.values.new_zeros(*codes.values.shape[:-1], d_sae)
    return dense.scatter_(-1, codes.indices, codes.values)


def geometric_median(x: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Geometric median of the rows of ``x`` (n, d) by Weiszfeld's algorithm, in float64.

    Used to initialise ``b_dec`` (Gao et al. 2024, following Bricken et al. 2023): unlike the mean
    it is not dragged by the few huge-norm tokens (BOS, attention sinks) of residual streams.
    """
    x = x.double()
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w @ x) / w.sum()
        converged = (y_next - y).norm() <= tol * y.norm().clamp_min(1e-12)
        y = y_next
        if converged:
            break
    return y


def init_params(
    d_in: int,
    d_sae: int,
    b_dec: Tensor,
    seed: int,
    device: str | torch.device = "cpu",
    norm: float = 1.0,
) -> TopKParams:
    """Random decoder rows of norm ``norm`` (1; Llama Scope: 0.5), ``W_enc = W_dec.T`` (Gao et
    al.'s tied init, also Llama Scope's), b_enc = 0.

    ``W_enc`` is returned as the transposed view of a contiguous (m, d) copy: the trainer keeps
    encoder and decoder in the same layout so that both weight gradients are row scatters.
    """
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(device)
    if norm != 1.0:
        W_dec *= norm
    b_enc = torch.zeros(d_sae, device=device)
    return TopKParams(W_dec.clone().t(), b_enc, W_dec, b_dec.float().to(device, copy=True))


def loss_and_grads(
    params: TopKParams,
    x: Tensor,
    k: int,
    *,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    auxk_coef: float = 1 / 32,
    pre_out: Tensor | None = None,
    grads_out: TopKParams | None = None,
    decoder_norm_aware: bool = False,
    scores_out: Tensor | None = None,
    selection_dtype: torch.dtype | None = None,
) -> StepResult:
    """Loss of batch ``x`` (B, d_in) and its exact gradient, by hand (see the module docstring).

    ``dead_mask`` (d_sae,) bool switches the AuxK term on. ``pre_out`` (B, d_sae) and
    ``grads_out`` (shaped like ``params``) are optional buffers, overwritten and returned, that
    spare the allocations (150 MB of pre-activations at full size) and output copies of a step.
    ``decoder_norm_aware`` selects the top k of ``pre * |W_dec rows|`` (Llama Scope), with
    ``scores_out`` (B, d_sae) an optional buffer for those scores. The selection is piecewise
    constant, so the gradient formulas are the same; only the decoder rows are not unit norm.
    ``selection_dtype`` (e.g. bfloat16) runs the dense GEMM, which only chooses the k latents,
    in that dtype (``pre_out`` and ``scores_out`` then in it too); the chosen pre-activations
    are recomputed exactly (:func:`selected_pre`), so everything after the choice is float32.
    """
    xc = x - params.b_dec  # (B, d)
    low = selection_dtype is not None and selection_dtype != x.dtype
    if low:
        pre = torch.addmm(params.b_enc.to(selection_dtype), xc.to(selection_dtype),
                          params.W_enc.to(selection_dtype), out=pre_out)  # fmt: skip
    else:
        pre = torch.addmm(params.b_enc, xc, params.W_enc, out=pre_out)  # (B, m), the dense GEMM
    if decoder_norm_aware:
        scores = torch.mul(pre, decoder_norms(params).to(pre.dtype), out=scores_out)
        idx = topk_rows(scores, k)[1]
        vals = selected_pre(params, xc, idx) if low else pre.gather(1, idx)
    else:
        vals, idx = topk_rows(pre, k)  # (B, k)
        if low:
            vals = selected_pre(params, xc, idx)
    acts = vals.relu()
    recon = F.embedding_bag(idx, params.W_dec, per_sample_weights=acts, mode="sum")
    err = recon.add_(params.b_dec).sub_(x)  # x_hat - x
    variance = (x.var(0, correction=0).sum() * x.shape[0]).clamp_min(torch.finfo(x.dtype).tiny)
    fvu = torch.dot(err.view(-1), err.view(-1)) / variance
    d_recon = err * (2.0 / variance)  # dL/dx_hat
    grads = _sparse_backward(params, xc, d_recon, vals, idx, acts, grads_out)
    auxk_loss = fvu.new_zeros(())
    if dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
        auxk_loss = _auxk_dense(params, xc, err, pre, dead_mask, k_aux, auxk_coef, variance, grads)
    # b_dec's gradient through the encoder input: sum_t dL/dxc_t = W_enc @ sum_t dL/dpre_t
    torch.addmv(d_recon.sum(0), params.W_enc, grads.b_enc, alpha=-1.0, out=grads.b_dec)
    return StepResult(grads, fvu + auxk_coef * auxk_loss, fvu, auxk_loss, TopKCodes(acts, idx))


def selected_pre(params: TopKParams, xc: Tensor, idx: Tensor) -> Tensor:
    """Exact pre-activations ``xc_t . W_enc[:, j] + b_enc[j]`` (B, k) of the latents ``idx``
    (B, k) only: a sampled dense-dense product, B * k * d multiply-adds (k / m of the GEMM)."""
    (B, k), m = idx.shape, params.W_enc.shape[1]
    crow = torch.arange(0, B * k + 1, k, device=xc.device)
    pattern = _csr(crow, idx.reshape(-1), xc.new_ones(B * k), (B, m))
    dots = torch.sparse.sampled_addmm(pattern, xc, params.W_enc, beta=0.0).values()
    return dots.view(B, k) + params.b_enc[idx]


def topk_rows(pre: Tensor, k: int, group: int = 32) -> tuple[Tensor, Tensor]:
    """``pre.topk(k, dim=1, sorted=False)`` of a (B, m) matrix, about 2x faster on CPU for m >> k.

    Exact: cut each row into groups of ``group``; tau, the k-th largest group maximum, is at most
    the row's k-th largest entry, and every entry >= tau lies in one of the k groups whose maxima
    reach tau. So the top k are among the >= tau entries of those k groups (about k + 2 of them
    for SAE pre-activations), which are packed into short rows for the final topk. This skips
    torch.topk's per-row copy and partial sort of all m entries. Ties at the k-th value may pick
    other (equal) entries than torch.topk. Falls back to torch.topk off-CPU, for small m, or NaNs.
    """
    B, m = pre.shape
    n_groups = m // group
    if pre.device.type != "cpu" or m % group or n_groups < 2 * k:
        return pre.topk(k, dim=1, sorted=False)
    groups = pre.view(B * n_groups, group)
    top = groups.amax(1).view(B, n_groups).topk(k, dim=1, sorted=False)
    tau = top.values.amin(1, keepdim=True)  # (B, 1)
    gid = top.indices + torch.arange(0, B * n_groups, n_groups).unsqueeze(1)  # (B, k) flat ids
    cand = groups.index_select(0, gid.view(-1)).view(B, k * group)
    rows, cols = (cand >= tau).nonzero(as_tuple=True)  # row-major, so grouped by row
    counts = torch.bincount(rows, minlength=B)
    if rows.numel() == 0 or int(counts.min()) < k:  # NaNs: let torch.topk decide
        return pre.topk(k, dim=1, sorted=False)
    slot = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    packed = pre.new_full((B, int(counts.max())), -torch.inf)
    packed[rows, slot] = cand[rows, cols]
    latent = torch.zeros(packed.shape, dtype=torch.int64)
    latent[rows, slot] = top.indices[rows, cols.div(group, rounding_mode="floor")] * group
    latent[rows, slot] += cols.remainder(group)
    vals, j = packed.topk(k, dim=1, sorted=False)
    return vals, latent.gather(1, j)


def _sparse_backward(
    params: TopKParams,
    xc: Tensor,
    d_recon: Tensor,
    vals: Tensor,
    idx: Tensor,
    acts: Tensor,
    out: TopKParams | None,
) -> TopKParams:
    """Gradients of the main term from the B*k selected (token t, latent j) pairs.

    ``dL/dz_tj = d_recon_t . W_dec[j]`` and ``dL/dpre_tj = dL/dz_tj * (pre_tj > 0)``; then
    ``dW_dec[j] = sum_t z_tj d_recon_t``, ``dW_enc[:, j] = sum_t dL/dpre_tj xc_t`` and
    ``db_enc[j] = sum_t dL/dpre_tj``. ``out.b_dec`` is left for the caller.
    """
    (B, k), m, dev = idx.shape, params.W_dec.shape[0], xc.device
    if out is None:
        d, new = xc.shape[1], partial(torch.empty, dtype=xc.dtype, device=dev)
        out = TopKParams(new(m, d).t(), new(m), new(m, d), new(d))
    flat = idx.reshape(-1)
    # dL/dz: a sampled dense-dense product on the token-major pattern (B, m) with k per row
    pattern = _csr(torch.arange(0, B * k + 1, k, device=dev), flat, acts.reshape(-1), (B, m))
    dz = torch.sparse.sampled_addmm(pattern, d_recon, params.W_dec.t(), beta=0.0).values()
    dpre = dz.masked_fill_(vals.reshape(-1) <= 0, 0.0)  # ReLU
    # the same pairs latent-major, as CSR (m, B), for the two weight gradients
    order = _stable_argsort(flat, m)
    crow = torch.zeros(m + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(flat, minlength=m), 0, out=crow[1:])
    token = order.div(k, rounding_mode="floor")
    dW_encT = out.W_enc.t()  # (m, d), like W_enc's storage
    # addmm(beta=0, out=...) writes the sparse products straight into the gradient buffers
    torch.addmm(
        out.W_dec,
        _csr(crow, token, acts.reshape(-1)[order], (m, B)),
        d_recon,
        beta=0.0,
        out=out.W_dec,
    )
    torch.addmm(dW_encT, _csr(crow, token, dpre[order], (m, B)), xc, beta=0.0, out=dW_encT)
    out.b_enc.zero_().index_add_(0, flat, dpre)
    return out


def _stable_argsort(keys: Tensor, n_keys: int) -> Tensor:
    """``keys.argsort(stable=True)`` (int64 indices), fast on CPU.

    torch's stable int64 argsort took a parallel path that measured 190 ms for the 131k keys of a
    full-size step (2 threads, loaded machine; 13% of the step); numpy's radix sort of uint16
    keys takes under 1 ms, single-threaded. Same permutation (a stable sort of the same keys).
    """
    if keys.device.type != "cpu" or n_keys > 2**16:
        return keys.to(torch.int32).argsort(stable=True).long()
    order = np.argsort(keys.numpy().astype(np.uint16), kind="stable")
    return torch.from_numpy(order.astype(np.int64))


def _auxk_dense(
    params: TopKParams,
    xc: Tensor,
    err: Tensor,
    pre: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    auxk_coef: float,
    variance: Tensor,
    grads: TopKParams,
) -> Tensor:
    """AuxK loss (scale included, auxk_coef not) from the dead latents; adds its gradients
    into ``grads``.

    Works densely on the dead latents' columns (B, n_dead): GEMMs there beat sparse products
    over B * k_aux pairs while fewer than ~6 k_aux latents are dead, and AuxK keeps it so.
    """
    dead = dead_mask.nonzero().squeeze(1)
    k_eff = min(k_aux, dead.numel())
    scale = min(dead.numel() / k_aux, 1.0)  # Gao et al., Appendix B.1
    if pre.dtype == xc.dtype:
        pre_dead = pre.index_select(1, dead)  # (B, n_dead)
    else:  # a low-precision selection GEMM: the dead columns exactly
        pre_dead = torch.addmm(params.b_enc[dead], xc, params.W_enc[:, dead])
    vals, j = pre_dead.topk(k_eff, dim=1, sorted=False)
    z = torch.zeros_like(pre_dead).scatter_(1, j, vals.relu())
    W_dead = params.W_dec.index_select(0, dead)  # (n_dead, d)
    aux_err = torch.addmm(err, z, W_dead)  # e_aux - (x - x_hat); the target is detached
    loss = scale * aux_err.pow(2).sum() / variance
    d_aux = aux_err.mul_(2.0 * auxk_coef * scale / variance)  # dL/de_aux
    dpre = (d_aux @ W_dead.t()).mul_(z > 0)  # (B, n_dead)
    grads.W_dec.index_add_(0, dead, z.t() @ d_aux)
    grads.W_enc.t().index_add_(0, dead, dpre.t() @ xc)
    grads.b_enc.index_add_(0, dead, dpre.sum(0))
    return loss


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


@torch.no_grad()
def project_decoder_grad_(W_dec: Tensor, grad: Tensor) -> None:
    """Remove from each decoder row's gradient its component along the (unit) row."""
    grad.addcmul_(torch.linalg.vecdot(grad, W_dec).unsqueeze(1), W_dec, value=-1.0)


@torch.no_grad()
def normalize_decoder_(W_dec: Tensor) -> None:
    """Rescale decoder rows to unit norm (Adam's per-coordinate steps leave the sphere)."""
    W_dec.div_(torch.linalg.vector_norm(W_dec, dim=1, keepdim=True).clamp_min(1e-12))


# ====================================================================== training
def lr_at(step: int, cfg: TopKTrainConfig) -> float:
    """Learning rate at 0-based ``step``: linear warm-up, constant, then (lr_cooldown_steps > 0)
    Llama Scope's linear cool-down to ``lr * lr_end_ratio``: the factor is
    ``min(1, (s + 1) / W, r + (1 - r) max(T - s, 1) / C)`` (OpenMOSS ``constantwithwarmup``)."""
    assert cfg.lr is not None
    factor = 1.0
    if cfg.lr_warmup_steps > 0:
        factor = min(factor, (step + 1) / cfg.lr_warmup_steps)
    if cfg.lr_cooldown_steps > 0:
        r = cfg.lr_end_ratio
        left = max(cfg.total_steps - step, 1)
        factor = min(factor, r + (1 - r) * left / cfg.lr_cooldown_steps)
    return cfg.lr * factor


def k_at(step: int, cfg: TopKTrainConfig) -> int:
    """Active latents at 0-based ``step``: Llama Scope's k warm-up from initial_k down to k."""
    if cfg.initial_k is None or cfg.k_warmup_steps == 0:
        return cfg.k
    k0, p = cfg.initial_k, min(1.0, step / cfg.k_warmup_steps)
    if cfg.k_schedule == "exponential":
        f = cfg.k_exponential_factor
        k_t = k0 - (k0 - cfg.k) * (1.0 - math.exp(-f * p)) / (1.0 - math.exp(-f))
    else:
        k_t = k0 + (cfg.k - k0) * p
    return max(cfg.k, math.ceil(k_t))


@dataclass
class TrainState:
    """Everything a step changes. ``leaves`` are the tensors Adam updates, in (m, d) layout."""

    leaves: list[Tensor]
    """[W_enc.T (m, d), b_enc, W_dec (m, d), b_dec]."""
    optimizer: torch.optim.Adam
    step: int = 0
    tokens_since_fired: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    act_scale: float = 1.0
    """The dataset-wise activation scale c the SAE trains on c * x (1.0: raw activations)."""

    @property
    def params(self) -> TopKParams:
        W_encT, b_enc, W_dec, b_dec = self.leaves
        return TopKParams(W_encT.t(), b_enc, W_dec, b_dec)

    def state_dict(self) -> dict[str, Any]:
        names = ("W_encT", "b_enc", "W_dec", "b_dec")
        return {
            "params": dict(zip(names, self.leaves)),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens_since_fired": self.tokens_since_fired,
            "act_scale": self.act_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for leaf, name in zip(self.leaves, ("W_encT", "b_enc", "W_dec", "b_dec")):
                leaf.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.act_scale = float(state["act_scale"])


def init_state(cfg: TopKTrainConfig, b_dec: Tensor, act_scale: float = 1.0) -> TrainState:
    """Fresh parameters (seeded by cfg.seed) with ``b_dec`` from the data, and a fused Adam.

    ``b_dec`` is in the training frame (of ``act_scale * x``)."""
    p = init_params(cfg.d_in, cfg.d_sae, b_dec, cfg.seed, cfg.device, cfg.decoder_init_norm)
    leaves = [p.W_enc.t(), p.b_enc, p.W_dec, p.b_dec]  # W_enc.t() is the contiguous (m, d) copy
    for leaf in leaves:  # persistent gradient buffers: each step overwrites them in place
        leaf.grad = torch.zeros_like(leaf)
    # fused=True: one multi-tensor kernel, ~4x faster than foreach on this CPU
    optimizer = torch.optim.Adam(
        leaves, lr=lr_at(0, cfg), betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True
    )
    counts = torch.zeros(cfg.d_sae, dtype=torch.int64, device=cfg.device)
    return TrainState(leaves, optimizer, 0, counts, act_scale)


def dataset_scale(x: Tensor) -> float:
    """Llama Scope's dataset-wise normalisation constant: c with mean_t |c x_t| = sqrt(d_in)."""
    mean_norm = float(torch.linalg.vector_norm(x.double(), dim=1).mean())
    if not mean_norm > 0:
        raise InputFileError("activations have zero mean norm: cannot normalise them dataset-wise")
    return math.sqrt(x.shape[1]) / mean_norm


def fold_params(params: TopKParams, act_scale: float, decoder_norm_aware: bool) -> TopKParams:
    """Weights of the same SAE for raw activations and plain TopK, in float64 arithmetic.

    Training sees ``x' = c x``: ``pre = (c x - b) W + e = (x - b / c)(c W) + e`` and the raw
    reconstruction is ``x_hat' / c = z (W_dec / c) + b / c``, so ``W_enc -> c W_enc``,
    ``W_dec -> W_dec / c``, ``b_dec -> b_dec / c`` (codes unchanged). Decoder-norm-aware
    selection on ``pre_j n_j`` becomes plain TopK with ``W_enc[:, j] -> n_j W_enc[:, j]``,
    ``b_enc[j] -> n_j b_enc[j]`` and unit rows ``W_dec[j] / n_j`` (codes ``n_j z_j``, the same
    reconstruction), which is what SAELens's ``rescale_acts_by_decoder_norm`` computes.
    """
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in params)
    W_enc, W_dec, b_dec = W_enc * act_scale, W_dec / act_scale, b_dec / act_scale
    if decoder_norm_aware:
        norms = torch.linalg.vector_norm(W_dec, dim=1).clamp_min(1e-30)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(1)
    return TopKParams(*(t.float().contiguous() for t in (W_enc, b_enc, W_dec, b_dec)))


def jumprelu_threshold(params: TopKParams, x: Tensor, k: int) -> float:
    """Llama Scope's TopK -> JumpReLU threshold: the (k * B)-th largest ReLU'd pre-activation
    over the batch ``x`` (B, d_in) of a plain-TopK SAE (after :func:`fold_params`).

    A JumpReLU with this one threshold for every latent fires ~k latents per token on average;
    on a token whose k-th largest pre-activation exceeds it and whose (k+1)-th does not, its
    codes equal the TopK codes exactly.
    """
    pre = ((x - params.b_dec) @ params.W_enc + params.b_enc).relu()
    return float(pre.reshape(-1).topk(k * x.shape[0], sorted=False).values.min())


@torch.no_grad()
def train_step(
    state: TrainState,
    x: Tensor,
    cfg: TopKTrainConfig,
    pre_out: Tensor | None = None,
    scores_out: Tensor | None = None,
) -> StepResult:
    """One optimisation step on batch ``x`` (B, d_in) of raw activations: loss, (unit-norm
    constrained unless decoder_norm_topk) Adam update. ``scores_out`` is the buffer of the
    decoder-norm-aware selection scores."""
    assert cfg.k_aux is not None
    if state.act_scale != 1.0:
        x = x * state.act_scale
    dead = state.tokens_since_fired > cfg.dead_tokens_threshold
    W_encT, b_enc, W_dec, b_dec = (leaf.grad for leaf in state.leaves)
    assert W_encT is not None and b_enc is not None and W_dec is not None and b_dec is not None
    out = loss_and_grads(
        state.params, x, k_at(state.step, cfg), dead_mask=dead, k_aux=cfg.k_aux,
        auxk_coef=cfg.auxk_coef, pre_out=pre_out,
        grads_out=TopKParams(W_encT.t(), b_enc, W_dec, b_dec),
        decoder_norm_aware=cfg.decoder_norm_topk, scores_out=scores_out,
        selection_dtype=SELECTION_DTYPES[cfg.selection_dtype],
    )  # fmt: skip
    if not cfg.decoder_norm_topk:
        project_decoder_grad_(state.leaves[2], W_dec)
    if cfg.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(state.leaves, cfg.clip_grad_norm, foreach=True)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    state.optimizer.step()
    if not cfg.decoder_norm_topk:
        normalize_decoder_(state.leaves[2])
    fired = out.codes.indices[out.codes.values > 0]
    state.tokens_since_fired.add_(x.shape[0]).index_fill_(0, fired, 0)
    state.step += 1
    return out


def train_topk(
    acts_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: TopKTrainConfig,
    checkpoint_dir: str | os.PathLike[str],
    progress: bool = True,
    *,
    log_path: str | os.PathLike[str] | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) a TopK SAE on an activations file; write it to ``out_dir``.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same configuration; the
    result is then bitwise identical to an uninterrupted run (same machine and thread count).
    The CSV log goes to ``log_path`` (default: ``<out_dir>.train_log.csv``, beside the output).
    ``stop_after_steps`` ends the session early after checkpointing (time-limited jobs, tests);
    ``out_dir`` is then not written. Returns the final statistics (also stored in cfg.json).
    """
    out_dir, ckpt = Path(out_dir), Path(checkpoint_dir) / CHECKPOINT_FILE
    log_path = Path(log_path) if log_path else out_dir.with_name(out_dir.name + ".train_log.csv")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    batch_kw = {} if cfg.buffer_tokens is None else {"buffer_tokens": cfg.buffer_tokens}
    with ActivationBatches(acts_path, cfg.batch_size, cfg.seed, **batch_kw) as batches:
        if batches.d != cfg.d_in:
            raise InputFileError(
                f"{acts_path}: dataset 'acts' has d={batches.d}, cfg.d_in={cfg.d_in}"
            )
        state = _resume(ckpt, cfg, batches)
        first = None
        if state is None:
            first = next(batches)
            scale = dataset_scale(first) if cfg.activation_norm == "dataset_wise" else 1.0
            state = init_state(
                cfg, geometric_median(first * scale if scale != 1.0 else first), scale
            )
        log = _CsvLog(log_path, state.step)
        stats = _run(state, batches, first, cfg, ckpt, log, progress, stop_after_steps)
        if state.step < cfg.total_steps:
            return stats
        params = fold_params(state.params, state.act_scale, cfg.decoder_norm_topk)
        stats["act_scale"] = state.act_scale
        if cfg.save_as == "jumprelu":  # one more batch, drawn after training
            stats["jumprelu_threshold"] = jumprelu_threshold(params, next(batches).float(), cfg.k)
    if cfg.save_as == "jumprelu":
        save_jumprelu(out_dir, params, stats["jumprelu_threshold"], cfg, stats)
    else:
        save_topk(out_dir, params, cfg, stats)
    return stats


def _run(
    state: TrainState,
    batches: ActivationBatches,
    first: Tensor | None,
    cfg: TopKTrainConfig,
    ckpt: Path,
    log: _CsvLog,
    progress: bool,
    stop_after_steps: int | None,
) -> dict[str, Any]:
    """The training loop from ``state.step``; ``first`` is the already-drawn batch of step 0."""
    end = cfg.total_steps if stop_after_steps is None else min(cfg.total_steps, stop_after_steps)
    pre_out = torch.empty(
        cfg.batch_size, cfg.d_sae, device=cfg.device, dtype=SELECTION_DTYPES[cfg.selection_dtype]
    )  # reused: no 150 MB allocation per step
    scores_out = torch.empty_like(pre_out) if cfg.decoder_norm_topk else None
    meter = _Meter()
    bar = tqdm(total=cfg.total_steps, initial=state.step, disable=not progress, unit="step")
    while state.step < end:
        x = (first if first is not None else next(batches)).to(cfg.device, non_blocking=True)
        first = None
        meter.add(train_step(state, x, cfg, pre_out, scores_out), x.shape[0])
        bar.update(1)
        # A row at every checkpoint too: a resumed run's means then start where the
        # uninterrupted run's do, so its log and final stats are the same.
        at_checkpoint = state.step % cfg.checkpoint_every_steps == 0
        if state.step % cfg.log_every_steps == 0 or at_checkpoint or state.step == end:
            log.write(meter.row(state, cfg))
            last = log.last or {}
            bar.set_postfix(fvu=f"{float(last['fvu']):.4f}", dead=last["dead_fraction"])
        if at_checkpoint or state.step == end < cfg.total_steps:
            save_checkpoint(ckpt, state, batches, cfg)
    bar.close()
    last = {key: v for key, v in (log.last or {}).items() if key != "step"}
    return {"steps": state.step, **last, "tokens": state.step * cfg.batch_size}


class _Meter:
    """Means of the step statistics since the last log row, and the token rate."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "fvu": 0.0, "auxk_loss": 0.0, "l0": 0.0}
        self.steps = self.tokens = 0
        self.since = time.perf_counter()

    def add(self, out: StepResult, n_tokens: int) -> None:
        self.sums["loss"] += float(out.loss)
        self.sums["fvu"] += float(out.fvu)
        self.sums["auxk_loss"] += float(out.auxk_loss)
        self.sums["l0"] += float((out.codes.values > 0).sum()) / n_tokens
        self.steps += 1
        self.tokens += n_tokens

    def row(self, state: TrainState, cfg: TopKTrainConfig) -> dict[str, Any]:
        now = time.perf_counter()
        dead = (state.tokens_since_fired > cfg.dead_tokens_threshold).float().mean()
        row = {
            "step": state.step,
            "tokens": state.step * cfg.batch_size,
            **{key: total / max(self.steps, 1) for key, total in self.sums.items()},
            "dead_fraction": float(dead),
            "lr": lr_at(state.step - 1, cfg),
            "tokens_per_s": self.tokens / max(now - self.since, 1e-9),
        }
        self.__init__()  # type: ignore[misc]
        return row


class _CsvLog:
    """Append-only CSV of log rows; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_through_step: int) -> None:
        self.path = path
        rows: list[dict[str, Any]] = []
        if keep_through_step > 0 and path.exists():
            with path.open(newline="") as f:
                rows = [_numbers(r) for r in csv.DictReader(f)]
            rows = [r for r in rows if r["step"] <= keep_through_step]
        self.last: dict[str, Any] | None = rows[-1] if rows else None
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(row)
        self.last = row


def _numbers(row: dict[str, str]) -> dict[str, Any]:
    return {key: int(v) if key in ("step", "tokens") else float(v) for key, v in row.items()}


def _resume_key(cfg: TopKTrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must share to be resumed (run length, cadence and device may
    change: a run checkpointed on a GPU node can finish on another, or on the CPU)."""
    key = asdict(cfg)
    for name in ("total_tokens", "checkpoint_every_steps", "log_every_steps", "device"):
        del key[name]
    return key


def save_checkpoint(
    path: Path, state: TrainState, batches: ActivationBatches, cfg: TopKTrainConfig
) -> None:
    """Atomically write params, Adam state, step, firing counters, stream position, RNG state."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": _resume_key(cfg),
        "state": state.state_dict(),
        "batches": batches.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "saeflow_version": __version__,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _resume(path: Path, cfg: TopKTrainConfig, batches: ActivationBatches) -> TrainState | None:
    """The state saved in ``path``, with ``batches`` repositioned; None if there is none to use."""
    if not path.exists():
        return None
    payload = torch.load(path, map_location=cfg.device, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("config") != _resume_key(cfg):
        print(
            f"{path}: checkpoint is for a different configuration; starting afresh", file=sys.stderr
        )
        return None
    state = init_state(cfg, torch.zeros(cfg.d_in))
    state.load_state_dict(payload["state"])  # act_scale included
    batches.load_state_dict(payload["batches"])
    torch.set_rng_state(payload["torch_rng"].cpu())
    print(f"{path}: resuming from the checkpoint at step {state.step}", file=sys.stderr)
    return state


# ====================================================================== SAELens files
def sae_lens_config(cfg: TopKTrainConfig, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json for SAELens 6 ``TopKSAE`` (architecture "topk"); saeflow's settings in metadata."""
    return {
        "architecture": "topk",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # decoder rows are kept at unit norm, so rescaling by their norms would change nothing
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            # >= 6.0 tells SAELens this is its v6 layout (older versions are converted on load)
            "sae_lens_version": _sae_lens_version(),
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "dataset_path": cfg.dataset,
            "training_architecture": "topk",
            "saeflow_version": __version__,
            "saeflow_train_config": asdict(cfg),
            "saeflow_train_stats": stats or {},
        },
    }


def _sae_lens_version() -> str:
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"


def save_topk(
    out_dir: str | os.PathLike[str],
    params: TopKParams,
    cfg: TopKTrainConfig,
    stats: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir`` (cfg.json + sae_weights.safetensors) atomically; returns its path."""
    weights = {
        name: getattr(params, name).detach().float().cpu().contiguous()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / "sae_weights.safetensors")
        text = json.dumps(sae_lens_config(cfg, stats), indent=2, sort_keys=True, default=str)
        (tmp / "cfg.json").write_text(text + "\n")
    return Path(out_dir)


def save_jumprelu(
    out_dir: str | os.PathLike[str],
    params: TopKParams,
    threshold: float,
    cfg: TopKTrainConfig,
    stats: dict[str, Any] | None = None,
) -> Path:
    """Write a TopK SAE converted to a SAELens ``JumpReLUSAE`` (architecture "jumprelu"):
    the same weights, and ``threshold`` for every latent (see :func:`jumprelu_threshold`)."""
    weights = {
        name: getattr(params, name).detach().float().cpu().contiguous()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    weights["threshold"] = torch.full((cfg.d_sae,), float(threshold))
    config = sae_lens_config(cfg, stats)
    del config["k"], config["rescale_acts_by_decoder_norm"]
    config["architecture"] = "jumprelu"
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / "sae_weights.safetensors")
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (tmp / "cfg.json").write_text(text + "\n")
    return Path(out_dir)


class LoadedTopK(NamedTuple):
    """A TopK SAE read from disk."""

    params: TopKParams
    """Weights in SAELens layout (float32)."""
    k: int
    """Active latents per token."""
    cfg: dict[str, Any]
    """The folder's cfg.json."""


def load_topk(path: str | os.PathLike[str]) -> LoadedTopK:
    """Read a SAELens-layout TopK folder (saeflow's or SAELens's own).

    ``rescale_acts_by_decoder_norm`` and ``apply_b_dec_to_input=False`` are folded into the
    weights, so :func:`encode` / :func:`decode` give the same codes and reconstructions.
    """
    path = Path(path)
    try:
        cfg = json.loads((path / "cfg.json").read_text())
        w = load_file(path / "sae_weights.safetensors")
    except (OSError, ValueError) as err:
        raise InputFileError(f"{path}: not a readable SAE folder ({err})") from err
    if cfg.get("architecture") != "topk":
        raise InputFileError(
            f"{path}/cfg.json: architecture is {cfg.get('architecture')!r}, expected 'topk'"
        )
    if cfg.get("normalize_activations", "none") != "none":
        raise InputFileError(
            f"{path}/cfg.json: normalize_activations is {cfg['normalize_activations']!r}, "
            "expected 'none' (fold the normalisation into the weights first)"
        )
    W_enc, b_enc, W_dec, b_dec = (w[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # x @ W_enc + b_enc == (x - b_dec) @ W_enc + b_enc'
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(1)
    return LoadedTopK(TopKParams(W_enc, b_enc, W_dec, b_dec), int(cfg["k"]), cfg)
