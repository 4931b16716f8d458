"""SAE training techniques of saex (neverix/saex, ``saex/sae.py``) as pure torch functions.

Each function takes tensors and returns tensors; autograd gives the gradients (the tests check
them against float64 references). Sources, per function:

- :func:`sparsity_penalty`: saex ``sparsity_loss_type`` ``l1 | l1_sqrt | tanh | hoyer | recip``.
  ``recip`` is ``z / (z + eps)``, the smooth L0 approximation saex credits to Farrell
  (``sparsity_loss_type=("recip", eps)``), with :func:`recip_eps` as its schedule;
  ``hoyer`` is the Hoyer-square measure ``(sum |z|)^2 / sum z^2`` per token (Kurz et al. 2020).
  ``decoder_norm_weighted`` multiplies each latent by its decoder-row norm first (saex
  ``anthropic_norm``, Anthropic's April 2024 update).
- :func:`dm_ghost_loss`: saex ``death_loss_type="dm_ghost_grads"``, DeepMind's scaled ghost
  grads: the dead latents' ``softplus(pre)`` decode the residual; the ghost reconstruction is
  rescaled to half the residual's norm, its loss to the main loss's size, and the whole term by
  the dead fraction (all scale factors under stop-gradient).
- :func:`project_parallel`: saex ``project_updates_from_dec`` / ``project_grads_from_dec``:
  remove from a decoder gradient or update the component parallel to each decoder row.
- :func:`restrict_decoder_norm`: saex ``restrict_dec_norm`` ``exact | lte | none``.
- :func:`normalize_input`: saex ``norm_input`` ``wes`` (per token to norm sqrt(d)), ``wes-mean``
  (by the batch's mean norm), ``wes-clip`` (only tokens above norm sqrt(d) are scaled down).
- :func:`pseudoinverse_init` / :func:`orthogonal_init`: saex ``decoder_init_method``
  ``pseudoinverse`` (5 rounds of pinv <-> row normalisation) and ``orthogonal``.
- The Wright-2024 parametrisation (a learned per-latent scale ``s`` after the ReLU; Wright &
  Sharkey 2024, "Addressing feature suppression in SAEs"; saex's ``s``/``scaling_factor``) is
  :func:`relu_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SPARSITY_LOSSES = ("l1", "l1_sqrt", "tanh", "hoyer", "recip")
DECODER_NORMS = ("exact", "lte", "none")
INPUT_NORMS = ("none", "wes", "wes-mean", "wes-clip")


def sparsity_penalty(
    z: Tensor,
    kind: str,
    *,
    eps: float = 0.1,
    stretch: float = 1.0,
    decoder_norms: Tensor | None = None,
) -> Tensor:
    """Per-token sparsity penalty (B,) of non-negative codes ``z`` (B, m).

    ``eps`` is recip's ``z / (z + eps)`` constant; ``stretch`` is tanh's ``tanh(stretch * z)``
    (saex: 1; Llama Scope's tanh loss uses 4); ``decoder_norms`` (m,) weights each latent.
    """
    if decoder_norms is not None:
        z = z * decoder_norms
    a = z.abs()
    if kind == "hoyer":
        return a.sum(-1).square() / z.square().sum(-1).clamp_min(1e-12)
    return _elementwise_penalty(a, kind, eps, stretch).sum(-1)


def sparsity_penalty_sparse(
    values: Tensor,
    rows: Tensor,
    n_rows: int,
    kind: str,
    *,
    eps: float = 0.1,
    stretch: float = 1.0,
    decoder_norms: Tensor | None = None,
) -> Tensor:
    """:func:`sparsity_penalty` of codes given by their nonzero ``values`` (nnz,) in token
    ``rows`` (nnz,) of ``n_rows`` tokens; ``decoder_norms`` (nnz,) are the norms of each value's
    latent. Every penalty is 0 at z = 0, so the zeros contribute nothing. Returns (n_rows,)."""
    if decoder_norms is not None:
        values = values * decoder_norms
    a = values.abs()
    per_token = partial(torch.zeros(n_rows, dtype=a.dtype, device=a.device).index_add, 0, rows)
    if kind == "hoyer":
        return per_token(a).square() / per_token(a.square()).clamp_min(1e-12)
    return per_token(_elementwise_penalty(a, kind, eps, stretch))


def _elementwise_penalty(a: Tensor, kind: str, eps: float, stretch: float) -> Tensor:
    """Each code's share of the l1 / l1_sqrt / tanh / recip penalty (``a = |z|``)."""
    if kind == "l1":
        return a
    if kind == "l1_sqrt":
        # sqrt has an infinite slope at 0: inactive latents contribute 0 and no gradient
        return torch.where(a > 0, a.clamp_min(1e-30).sqrt(), 0.0)
    if kind == "tanh":
        return torch.tanh(stretch * a)
    if kind == "recip":
        return a / (a + eps)
    raise ValueError(f"sparsity loss {kind!r}: expected one of {', '.join(SPARSITY_LOSSES)}")


def recip_eps(step: int, schedule: Sequence[tuple[int, float]], eps0: float = 1.0) -> float:
    """The recip loss's eps at ``step``: log-linear from ``eps0`` at step 0 through the
    (step, eps) knots of ``schedule``, constant after the last (saex's ``recip_schedule``
    ``((100000, 0.1),)`` anneals towards L0 this way; the interpolation is saeflow's reading)."""
    last_step, last_eps = 0, eps0
    for knot_step, knot_eps in schedule:
        if step < knot_step:
            t = (step - last_step) / max(knot_step - last_step, 1)
            return math.exp((1 - t) * math.log(last_eps) + t * math.log(knot_eps))
        last_step, last_eps = knot_step, knot_eps
    return last_eps


class ReluParams(NamedTuple):
    """A ReLU SAE with saex's per-latent scale (SAELens layout otherwise)."""

    W_enc: Tensor
    """(d, m) encoder."""
    b_enc: Tensor
    """(m,) encoder bias."""
    s: Tensor
    """(m,) per-latent scale after the ReLU (Wright & Sharkey 2024)."""
    W_dec: Tensor
    """(m, d) decoder."""
    b_dec: Tensor
    """(d,) decoder bias, subtracted from the input."""


class ReluForward(NamedTuple):
    pre: Tensor
    """(B, m) pre-activations."""
    z: Tensor
    """(B, m) codes ``relu(pre) * s``."""
    x_hat: Tensor
    """(B, d) reconstruction."""


def relu_forward(p: ReluParams, x: Tensor) -> ReluForward:
    """``pre = (x - b_dec) W_enc + b_enc``, ``z = relu(pre) * s``, ``x_hat = z W_dec + b_dec``."""
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    z = F.relu(pre) * p.s
    return ReluForward(pre, z, z @ p.W_dec + p.b_dec)


class GatedForward(NamedTuple):
    pre: Tensor
    """(B, m) magnitude pre-activations ``(x - b_dec) W_enc + b_enc``."""
    gate_pre: Tensor
    """(B, m) gate pre-activations ``((x - b_dec) W_enc) * softplus(s_gate) * s + b_gate``."""
    z: Tensor
    """(B, m) codes ``1[gate_pre > 0] * relu(pre) * s``."""
    x_hat: Tensor
    """(B, d) reconstruction."""


def gated_forward(p: ReluParams, s_gate: Tensor, b_gate: Tensor, x: Tensor) -> GatedForward:
    """saex's gated SAE (``is_gated``): the gate shares ``W_enc``, rescaled per latent by
    ``softplus(s_gate) * s`` (SAELens's GatedSAE instead rescales the magnitude path by
    ``exp(r_mag)``); the magnitude path is the ReLU SAE's ``relu(pre) * s``."""
    xw = (x - p.b_dec) @ p.W_enc
    pre = xw + p.b_enc
    gate_pre = xw * (F.softplus(s_gate) * p.s) + b_gate
    z = (gate_pre > 0).to(x.dtype) * F.relu(pre) * p.s
    return GatedForward(pre, gate_pre, z, z @ p.W_dec + p.b_dec)


def gated_aux_loss(gate_pre: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor) -> Tensor:
    """saex's auxiliary gated reconstruction loss (per token, (B,)): decode ``relu(gate_pre)``
    with the decoder under stop-gradient, so that the gate learns to reconstruct."""
    x_aux = F.relu(gate_pre) @ W_dec.detach() + b_dec.detach()
    return (x_aux - x).square().sum(-1)


def dm_ghost_loss(
    x: Tensor, x_hat: Tensor, pre: Tensor, s: Tensor, W_dec: Tensor, dead: Tensor, eps: float = 1e-3
) -> Tensor:
    """DeepMind's scaled ghost-grads loss (scalar) as in saex ``dm_ghost_grads``.

    ``pre`` (B, m) pre-activations, ``dead`` (m,) bool. The dead latents' ``softplus(pre) * s``
    decode the (stop-gradient) residual; zero when nothing is dead.
    """
    if not bool(dead.any()):
        return x.new_zeros(())
    ghost = (F.softplus(pre) * s * dead) @ W_dec  # (B, d)
    residual = (x - x_hat).detach()
    scale = residual.norm(dim=-1, keepdim=True) / (ghost.norm(dim=-1, keepdim=True) * 2 + eps)
    ghost = ghost * scale.detach()
    ghost_loss = (ghost - residual).square()  # (B, d)
    recon_loss = (x_hat - x).square().detach()
    ghost_loss = ghost_loss * (recon_loss / (ghost_loss.detach() + eps))
    return ghost_loss.mean(-1).mean() * dead.to(x.dtype).mean()


def project_parallel(W_dec: Tensor, g: Tensor) -> Tensor:
    """``g`` (m, d) minus its component along each row of ``W_dec`` (m, d)."""
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return g - unit * (unit * g).sum(1, keepdim=True)


def restrict_decoder_norm(W_dec: Tensor, mode: str) -> Tensor:
    """Decoder rows at unit norm (``exact``), at most unit norm (``lte``) or as they are."""
    if mode == "none":
        return W_dec
    norms = W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if mode == "exact":
        return W_dec / norms
    if mode == "lte":
        return W_dec / norms.clamp_min(1.0)
    raise ValueError(f"decoder norm {mode!r}: expected one of {', '.join(DECODER_NORMS)}")


def normalize_input(x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(x * c, c)`` with per-token factors c (B, 1) of saex's ``norm_input`` variants."""
    target = math.sqrt(x.shape[-1])
    norms = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if mode == "none":
        c = torch.ones_like(norms)
    elif mode == "wes":
        c = target / norms
    elif mode == "wes-mean":
        c = (target / norms.mean()).expand_as(norms)
    elif mode == "wes-clip":
        c = (target / norms).clamp(max=1.0)
    else:
        raise ValueError(f"input norm {mode!r}: expected one of {', '.join(INPUT_NORMS)}")
    return x * c, c


def orthogonal_init(m: int, d: int, gen: torch.Generator) -> Tensor:
    """(m, d) unit rows from an orthogonal matrix (rows orthonormal where m <= d)."""
    q = torch.linalg.qr(torch.randn(max(m, d), min(m, d), generator=gen, dtype=torch.float64))[0]
    W = q if m >= d else q.T  # (m, d)
    return (W / W.norm(dim=1, keepdim=True)).float()


def pseudoinverse_init(W_enc: Tensor, rounds: int = 5) -> tuple[Tensor, Tensor]:
    """saex's pseudoinverse init: ``W_dec = pinv(W_enc)`` row-normalised, alternated ``rounds``
    times, so that the decoder rows are unit norm and ``W_dec ~ pinv(W_enc)``. Returns
    (W_enc (d, m), W_dec (m, d))."""
    W = W_enc.double()
    W_dec = torch.linalg.pinv(W)
    for _ in range(rounds):
        W_dec = torch.linalg.pinv(W)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        W = torch.linalg.pinv(W_dec)
    return W.float(), W_dec.float()
