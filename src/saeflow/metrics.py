"""Reconstruction and downstream metrics as pure functions (tensors in, numbers out).

Definitions follow SAELens's ``run_evals`` and the Dark Matter code (seed 000):

- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens and dims (1 - explained variance).
- MSE = mean over tokens and dims of (x_hat - x)^2.
- L0  = number of non-zero latents per token.
- CE-loss score = (CE_ablated - CE_sae) / (CE_ablated - CE_clean): 1 is perfect, 0 is as bad as
  zero-ablating the site.
- KL score = (KL_ablated - KL_sae) / KL_ablated, KL taken as KL(clean || patched) per token.

Whole-dataset quantities are accumulated in float64 over chunks by :class:`ReconstructionStats`,
so that a streamed result equals the one computed on all rows at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained of ``x_hat`` as a reconstruction of ``x`` ([n, d] each)."""
    x64, r64 = x.double(), x_hat.double()
    residual = (x64 - r64).pow(2).sum()
    total = (x64 - x64.mean(dim=0)).pow(2).sum()
    return float(residual / total)


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean squared error over all tokens and dimensions."""
    return float((x.double() - x_hat.double()).pow(2).mean())


def l0(latents: Tensor) -> Tensor:
    """Number of non-zero latents per token: [n, d_sae] -> [n]."""
    return (latents != 0).sum(dim=-1)


@dataclass
class ReconstructionStats:
    """Streaming accumulator of FVU, MSE and L0 over chunks (float64 sums)."""

    d: int
    n: int = 0
    sum_x: Tensor = field(init=False)
    sum_sq_x: float = 0.0
    sum_sq_err: float = 0.0
    sum_l0: float = 0.0

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d, dtype=torch.float64)

    def update(self, x: Tensor, x_hat: Tensor, l0_per_token: Tensor) -> None:
        """Add one chunk: activations and reconstructions [n, d], L0 [n]."""
        x64 = x.double()
        self.n += x.shape[0]
        self.sum_x += x64.sum(dim=0)
        self.sum_sq_x += float(x64.pow(2).sum())
        self.sum_sq_err += float((x64 - x_hat.double()).pow(2).sum())
        self.sum_l0 += float(l0_per_token.double().sum())

    @property
    def total_variance(self) -> float:
        """sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2."""
        mean = self.sum_x / self.n
        return self.sum_sq_x - self.n * float(mean.pow(2).sum())

    def result(self) -> dict[str, float]:
        return {
            "fvu": self.sum_sq_err / self.total_variance,
            "mse": self.sum_sq_err / (self.n * self.d),
            "mean_l0": self.sum_l0 / self.n,
            "n_tokens": self.n,
        }


#: The float64 log-softmax runs over at most this many logits at a time (16 MiB). glibc hands
#: out blocks over 32 MiB as fresh pages on every call, and on the 2-core test machine faulting
#: them in cost as much as the arithmetic (half of an ``evaluate_sae`` job was system time).
SLICE_ELEMENTS = 1 << 21


def prediction_slices(shape: Sequence[int]) -> Iterator[tuple[int, slice]]:
    """(row, positions) blocks that cover the predictions [b, t-1] of logits of ``shape``
    [b, t, v], each at most :data:`SLICE_ELEMENTS` logits (and at least one position)."""
    b, t, v = shape
    step = max(1, SLICE_ELEMENTS // v)
    for row in range(b):
        for start in range(0, t - 1, step):
            yield row, slice(start, min(start + step, t - 1))


def log_probs(logits: Tensor) -> Tensor:
    """Float64 log-softmax of the predicting positions: logits [b, t, v] -> [b, t-1, v]."""
    b, t, v = logits.shape
    out = torch.empty(b, t - 1, v, dtype=torch.float64, device=logits.device)
    for row, pos in prediction_slices(logits.shape):
        out[row, pos] = torch.log_softmax(logits[row, pos].double(), dim=-1)
    return out


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-token next-token cross-entropy (float64): logits [b, t, v], tokens [b, t] -> [b, t-1]."""
    b, t, _ = logits.shape
    out = torch.empty(b, t - 1, dtype=torch.float64, device=logits.device)
    for row, pos in prediction_slices(logits.shape):
        logp = torch.log_softmax(logits[row, pos].double(), dim=-1)
        out[row, pos] = _nll(logp, tokens[row, pos.start + 1 : pos.stop + 1])
    return out


def next_token_nll(logp: Tensor, tokens: Tensor) -> Tensor:
    """:func:`next_token_ce` from log-probabilities already computed: logp [b, t or t-1, v]."""
    return -logp[:, : tokens.shape[1] - 1].gather(-1, tokens[:, 1:, None].long()).squeeze(-1)


def spliced_ce_kl(clean_logp: Tensor, spliced_logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per prediction, the next-token CE of ``spliced_logits`` [b, t, v] and KL(clean || spliced),
    each [b, t-1] float64; ``clean_logp`` is :func:`log_probs` of the clean logits, so a batch
    with several splices computes it once."""
    b, t, _ = spliced_logits.shape
    ce = torch.empty(b, t - 1, dtype=torch.float64, device=spliced_logits.device)
    kl = torch.empty_like(ce)
    for row, pos in prediction_slices(spliced_logits.shape):
        logq = torch.log_softmax(spliced_logits[row, pos].double(), dim=-1)
        logp = clean_logp[row, pos]
        ce[row, pos] = _nll(logq, tokens[row, pos.start + 1 : pos.stop + 1])
        kl[row, pos] = (logp.exp() * (logp - logq)).sum(dim=-1)
    return ce, kl


def _nll(logp: Tensor, targets: Tensor) -> Tensor:
    """-logp[i, targets[i]]: logp [n, v], targets [n] -> [n]."""
    return -logp.gather(-1, targets[:, None].long()).squeeze(-1)


def recovered_score(clean: float, patched: float, ablated: float) -> float:
    """(ablated - patched) / (ablated - clean): 1 when patched == clean, 0 when == ablated."""
    return (ablated - patched) / (ablated - clean)
