"""The saex loss on the support of the codes: one dense GEMM, every other product sparse.

:func:`saeflow.saex_train.loss_terms` builds the loss densely and lets autograd differentiate
it: five dense (B, d) x (d, m) products a step (the encoder, the decoder, and in the backward
``dW_dec``, ``dL/dz`` and ``dW_enc``), while a trained ReLU SAE has a few dozen of its
thousands of latents active per token. Outside the support

    S = {(t, j): pre_tj > 0}          (gated: gate_pre_tj > 0)

every code is zero and every gradient of the loss is zero, because the ReLU (gated: the gate's
step function, and ``relu(gate_pre)`` in the penalty and the auxiliary loss) passes none there.
So only the encoder product needs every (t, j); it runs without a graph, and S is read off it.
On S, with nnz pairs:

- the codes, the penalty, the gate and the ghost-free loss are the same formulas as the dense
  path, evaluated on the nnz values (:func:`saeflow.techniques.sparsity_penalty_sparse`), and
  autograd differentiates them;
- the reconstruction is an embedding bag over S (nnz * d multiply-adds, autograd gives
  ``dW_dec`` and ``dL/dz`` over S the same way);
- the encoder values ``xw_tj = (x_t - b_dec) . W_enc[:, j]`` enter the graph through
  :class:`_SupportXW`, whose backward is ``dW_enc[:, j] = sum_{t in S_j} g_tj (x_t - b_dec)``,
  a CSR (m, B) x (B, d) product, and ``db_dec = -W_enc @ sum_t g_t``.

The gradients are those of the dense path up to rounding (``tests/unit/test_saex_support.py``
checks every sparsity loss, gated or not, with and without decoder-norm weighting, against it
in float64). Ghost grads act on the dead latents' ``softplus(pre)``, which is dense, so they
keep the dense path; so does a batch whose support is denser than ``max_density`` (the start
of training, before the penalty has thinned the codes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow import techniques as T
from saeflow.topk import _csr, _stable_argsort

if TYPE_CHECKING:
    from saeflow.saex_train import SaexTrainConfig

MAX_DENSITY = 0.15
"""Above this share of active (token, latent) pairs the dense path is used instead. Measured
at d 576, B 4,096, 2 threads: the support path's step takes 0.31 / 0.47 / 0.65 of the dense
one at densities 5 / 10 / 15% for m 2,304 (0.42 / 0.63 / 0.79 for m 9,216) and breaks even
near 20%."""


class _SupportXW(torch.autograd.Function):
    """``xw[rows, cols]`` of a precomputed ``xw = (x - b_dec) @ W_enc (+ b_enc)``, in the
    graph of ``W_enc``, ``b_dec`` (and ``b_enc`` when given) with a sparse backward."""

    @staticmethod
    def forward(  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx: Any, W_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor, xw: Tensor, xc: Tensor,
        rows: Tensor, cols: Tensor,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(W_enc, xc, rows, cols)
        ctx.with_b_enc = b_enc is not None
        return xw[rows, cols]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        g = grads[0]
        W_enc, xc, rows, cols = ctx.saved_tensors
        (B, _), m = xc.shape, W_enc.shape[1]
        per_latent = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        order = _stable_argsort(cols, m)  # latent-major, tokens ascending within a latent
        crow = torch.zeros(m + 1, dtype=torch.int64, device=g.device)
        torch.cumsum(torch.bincount(cols, minlength=m), 0, out=crow[1:])
        dW_encT = _csr(crow, rows[order], g[order], (m, B)) @ xc  # (m, d)
        db_enc = per_latent if ctx.with_b_enc else None
        return dW_encT.t(), db_enc, -(W_enc @ per_latent), None, None, None, None


def support_loss_terms(
    leaves: list[Tensor], x: Tensor, cfg: SaexTrainConfig, eps: float,
    max_density: float = MAX_DENSITY,
) -> dict[str, Tensor] | None:  # fmt: skip
    """The terms of :func:`saeflow.saex_train.loss_terms` (fvu, sparsity, ghost = 0, gated_aux,
    loss, fired (m,) bool, l0) computed on the support; None when the support holds more than
    ``max_density`` of the (token, latent) pairs, or ghost grads are on."""
    if cfg.ghost_grads:
        return None
    W_enc, b_enc, s, W_dec, b_dec = leaves[:5]
    with torch.no_grad():  # the step's one dense product, and the support read off it
        xc = x - b_dec
        if cfg.gated:
            xw = xc @ W_enc
            rows, cols = (xw * (F.softplus(leaves[5]) * s) + leaves[6] > 0).nonzero(as_tuple=True)
        else:
            xw = torch.addmm(b_enc, xc, W_enc)  # pre-activations
            rows, cols = (xw > 0).nonzero(as_tuple=True)  # row-major: tokens ascending
    B = x.shape[0]
    if rows.numel() > max_density * B * W_enc.shape[1]:
        return None
    counts = torch.bincount(rows, minlength=B)
    offsets = counts.cumsum(0) - counts
    # the encoder values on the support: pre itself, or (gated) xw with b_enc added here
    vals = _SupportXW.apply(W_enc, None if cfg.gated else b_enc, b_dec, xw, xc, rows, cols)
    assert isinstance(vals, Tensor)
    del xw
    pre, s_vals = (vals + b_enc[cols] if cfg.gated else vals), s[cols]
    variance = (x - x.mean(0)).square().sum(-1).mean().clamp_min(1e-12)
    aux = x.new_zeros(())
    if cfg.gated:
        gate_vals = vals * (F.softplus(leaves[5][cols]) * s_vals) + leaves[6][cols]
        z = (gate_vals > 0).to(x.dtype) * F.relu(pre) * s_vals
        penalised = F.relu(gate_vals)
        x_aux = F.embedding_bag(cols, W_dec.detach(), offsets, per_sample_weights=penalised,
                                mode="sum") + b_dec.detach()  # fmt: skip
        aux = (x_aux - x).square().sum(-1).mean() / variance
    else:
        z = F.relu(pre) * s_vals
        penalised = z
    x_hat = F.embedding_bag(cols, W_dec, offsets, per_sample_weights=z, mode="sum") + b_dec
    fvu = (x_hat - x).square().sum(-1).mean() / variance
    norms = W_dec.norm(dim=1)[cols] if cfg.decoder_norm_weighted else None
    penalty = T.sparsity_penalty_sparse(
        penalised, rows, B, cfg.sparsity_loss, eps=eps, stretch=cfg.tanh_stretch,
        decoder_norms=norms,
    ).mean()  # fmt: skip
    active = z.detach() > 0
    fired = torch.zeros(W_enc.shape[1], dtype=torch.bool, device=x.device)
    fired[cols[active]] = True
    return {
        "loss": fvu + cfg.sparsity_coefficient * penalty + aux, "fvu": fvu, "sparsity": penalty,
        "ghost": x.new_zeros(()), "gated_aux": aux, "fired": fired,
        "l0": active.sum().to(x.dtype) / B,
    }  # fmt: skip
