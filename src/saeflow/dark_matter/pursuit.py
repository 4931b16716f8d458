"""Batched non-negative gradient pursuit on an SAE's decoder (Blumensath & Davies 2008).

The Dark Matter code (``encoder_pursuit.py``) asks how much of an SAE's error is due to its
encoder: it re-encodes each token with gradient pursuit on the SAE's own decoder, on the target
x − b_dec, with non-negative coefficients and as many pursuit steps as the SAE's own L0 on that
token, then compares the reconstruction error with the SAE's.

Each step, per token (r = x − b_dec − Σ_s v_s W_s is the residual, S the support):

1. select the atom outside S with the largest positive inner product ⟨W_i, r⟩ and add it to S;
   a token with no positively correlated atom left stops early (no non-negative step helps);
2. gradient on the support, g_s = ⟨W_s, r⟩, projected so that coefficients already at 0 are not
   pushed negative; optimal step α = ‖g‖² / ‖Σ_s g_s W_s‖²;
3. v ← v + α g, with α capped where the first coefficient reaches 0.

Two deliberate differences from the original, which keeps a dense [tokens, d_sae] weight matrix,
may re-select an atom already in the support, and clips at 0 after an unconstrained step:
here a step adds a new atom (so a token's support has exactly its target L0 atoms unless it
stops early), and the capped step keeps v >= 0 without clipping, so the reconstruction error
never increases from one step to the next (clipping after the step can increase it). The
support is stored sparsely ([tokens, L0] indices and values), so memory is O(chunk·d_sae) for
the correlations plus O(chunk·L0·d) for the selected atoms, whatever the number of tokens.
Atoms are compared by raw inner product, as in the original (decoder rows need not be unit norm).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PursuitResult(NamedTuple):
    """Sparse codes and reconstructions of a batch of tokens."""

    indices: Tensor  # [n, L] int64 atom ids in selection order; -1 in unused slots
    values: Tensor  # [n, L] coefficients >= 0 (0 in unused slots)
    reconstruction: Tensor  # [n, d] b_dec + sum_s values[:, s] * W_dec[indices[:, s]]


def gradient_pursuit(w_dec: Tensor, b_dec: Tensor, x: Tensor, target_l0: Tensor,
                     chunk_tokens: int = 256) -> PursuitResult:
    """Encode x [n, d] on the decoder w_dec [d_sae, d], b_dec [d]; token t gets target_l0[t] steps.

    ``L = max(target_l0)``; tokens are processed ``chunk_tokens`` at a time, in w_dec's dtype.
    """
    n, d = x.shape
    if w_dec.ndim != 2 or w_dec.shape[1] != d or b_dec.shape != (d,) or target_l0.shape != (n,):
        raise ValueError(f"expected w_dec [d_sae, {d}], b_dec [{d}], target_l0 [{n}]; got "
                         f"{tuple(w_dec.shape)}, {tuple(b_dec.shape)}, {tuple(target_l0.shape)}")
    target = target_l0.long()
    if n and int(target.min()) < 0:
        raise ValueError("target_l0 must be >= 0")
    max_l0 = int(target.max()) if n else 0
    indices = torch.full((n, max_l0), -1, dtype=torch.long)
    values = torch.zeros(n, max_l0, dtype=w_dec.dtype)
    recon = torch.empty(n, d, dtype=w_dec.dtype)
    for start in range(0, n, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        chunk = pursue_chunk(w_dec, x[rows].to(w_dec.dtype) - b_dec, target[rows])
        width = chunk.indices.shape[1]
        indices[rows, :width], values[rows, :width] = chunk.indices, chunk.values
        recon[rows] = chunk.reconstruction + b_dec
    return PursuitResult(indices, values, recon)


def pursue_chunk(w_dec: Tensor, signal: Tensor, target: Tensor) -> PursuitResult:
    """Pursuit of signal [b, d] (already minus b_dec); reconstruction returned without b_dec."""
    b, d = signal.shape
    max_l0 = int(target.max()) if b else 0
    idx = torch.full((b, max_l0), -1, dtype=torch.long)
    val = torch.zeros(b, max_l0, dtype=signal.dtype)
    atoms = torch.zeros(b, max_l0, d, dtype=signal.dtype)  # W_dec rows of each token's support
    resid = signal.clone()
    live = target > 0
    for k in range(max_l0):
        live &= target > k
        rows = live.nonzero().squeeze(1)
        if len(rows) == 0:
            break
        corr = resid[rows] @ w_dec.T  # [b_live, d_sae]
        if k:
            corr.scatter_(1, idx[rows, :k], float("-inf"))  # only atoms not yet in the support
        best_val, best = corr.max(1)
        stuck = best_val <= 0
        live[rows[stuck]] = False
        rows, best = rows[~stuck], best[~stuck]
        idx[rows, k] = best
        atoms[rows, k] = w_dec[best]
        val[rows, : k + 1], resid[rows] = _step(atoms[rows, : k + 1], val[rows, : k + 1],
                                                  signal[rows], resid[rows])
    return PursuitResult(idx, val, signal - resid)


def _step(atoms: Tensor, val: Tensor, signal: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
    """One projected gradient step on the support: atoms [b, k, d], val [b, k] -> (val, resid)."""
    grad = torch.einsum("bkd,bd->bk", atoms, resid)
    grad = torch.where((val <= 0) & (grad < 0), 0.0, grad)  # a coefficient at 0 cannot go lower
    direction = torch.einsum("bk,bkd->bd", grad, atoms)
    step = grad.square().sum(1) / direction.square().sum(1)  # exact line search along direction
    # cap the step where the first decreasing coefficient reaches 0 (keeps v >= 0 without clipping)
    to_zero = torch.where(grad < 0, val / -grad, torch.inf).amin(1)
    step = torch.minimum(step, to_zero)
    val = (val + step[:, None] * grad).clamp_min(0)  # clamp only removes rounding below 0
    return val, signal - torch.einsum("bk,bkd->bd", val, atoms)
