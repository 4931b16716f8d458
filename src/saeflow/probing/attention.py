"""The multi-token attention probe of the original (reference B3, ``run_multi_token_acts.py``).

A probe over all positions of a prompt: per position t a score s_t = x_t . a (``attn``), a softmax
over the real positions (padding masked out: the original set zero scores to -1e4), and the logit
sum_t softmax(s)_t (x_t . w) + b (``out`` and the bias). Trained full-batch with Adam (the
original's lr 1e-4, 1000 epochs) on 80% of the training rows; the parameters of the epoch of best
validation AUC on the other 20% are kept (the original's selection), then scored on the test rows.

Memory is bounded by the inputs: ``x`` [n, T, d] with T the longest kept prompt (``max_length``),
padded; each step holds a few [n, T] tensors besides it. :func:`pool` gives the mean- and
max-pooled inputs of the original's aggregated SAE probes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


@dataclass(frozen=True)
class AttentionResult:
    """Scores of one attention probe (the original's ``test_auc``, ``val_auc``) and its epoch."""

    test_auc: float
    val_auc: float
    best_epoch: int


def _mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """bool [n, T]: True at the real positions of each row (the first ``lengths[i]``)."""
    return torch.arange(width)[None, :] < lengths[:, None]


def logits(x: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor, out: torch.Tensor,
           bias: torch.Tensor) -> torch.Tensor:
    """[n] probe logits of ``x`` [n, T, d] with real positions ``mask`` [n, T]."""
    scores = (x @ attn).masked_fill(~mask, -1e4)  # the original's -1e4 for masked positions
    weights = torch.softmax(scores, dim=1)
    return (weights * (x @ out)).sum(1) + bias


def _auc(y: np.ndarray, s: torch.Tensor) -> float:
    return float(roc_auc_score(y, s.detach().double().numpy())) if len(np.unique(y)) == 2 else 0.5


def fit_attention(x_train: np.ndarray, len_train: np.ndarray, y_train: np.ndarray,
                  x_test: np.ndarray, len_test: np.ndarray, y_test: np.ndarray,
                  epochs: int = 1000, lr: float = 1e-4, val_frac: float = 0.2,
                  seed: int = 42) -> AttentionResult:
    """Train on a seeded 80% of the training rows, keep the epoch of best validation AUC (first
    on ties), score the test rows. ``x_*`` float32 [n, T, d]; ``len_*`` real positions per row."""
    if x_train.ndim != 3 or x_test.ndim != 3:
        raise ValueError(f"inputs must be [n, T, d]; got {x_train.shape} and {x_test.shape}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y_train), generator=gen).numpy()
    n_val = max(1, round(val_frac * len(y_train)))
    val, fit = perm[:n_val], perm[n_val:]
    x = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    m = _mask(torch.from_numpy(np.asarray(len_train)), x.shape[1])
    y = torch.from_numpy(y_train.astype(np.float32))
    d = x.shape[2]
    attn = (torch.randn(d, generator=gen) / d**0.5).requires_grad_()
    out = (torch.randn(d, generator=gen) / d**0.5).requires_grad_()
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([attn, out, bias], lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best = (-1.0, 0, (attn.detach().clone(), out.detach().clone(), bias.detach().clone()))
    for epoch in range(epochs):
        opt.zero_grad()
        loss = loss_fn(logits(x[fit], m[fit], attn, out, bias), y[fit])
        loss.backward()
        opt.step()
        with torch.no_grad():
            v = _auc(y_train[val], logits(x[val], m[val], attn, out, bias))
        if v > best[0]:
            best = (v, epoch, (attn.detach().clone(), out.detach().clone(), bias.detach().clone()))
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
        mt = _mask(torch.from_numpy(np.asarray(len_test)), xt.shape[1])
        test = _auc(y_test, logits(xt, mt, *best[2]))
    return AttentionResult(test, best[0], best[1])


def pool(x: np.ndarray, lengths: np.ndarray, how: str, skip_first: bool = True) -> np.ndarray:
    """[n, d] mean or max over each row's real positions (the original pooled 1..last, skipping
    position 0, the BOS; a one-token row keeps its only position)."""
    width = x.shape[1]
    lengths = np.asarray(lengths)
    start = np.where(skip_first & (lengths > 1), 1, 0)
    pos = np.arange(width)[None, :]
    mask = (pos >= start[:, None]) & (pos < lengths[:, None])
    if how == "mean":
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    if how == "max":
        return np.where(mask[..., None], x, -np.inf).max(1)
    raise ValueError(f"pool '{how}': expected mean or max")


def concat_pca(x_train: np.ndarray, x_test: np.ndarray, n_components: int = 20
               ) -> tuple[np.ndarray, np.ndarray]:
    """The original's multi-token ``concat`` baseline features: per position t >= 1, a PCA of
    the training rows' ``x[:, t]`` to ``n_components`` dimensions (centred by the training mean;
    fewer where the training rows span fewer), concatenated over positions.

    ``x_train`` [n, T, d], ``x_test`` [m, T, d] -> [n, P], [m, P] with P <= n_components (T - 1).
    Padded positions are zero rows, as in the fixed-length inputs the original decomposed.
    """
    train, test = [], []
    for t in range(1 if x_train.shape[1] > 1 else 0, x_train.shape[1]):
        a = x_train[:, t].astype(np.float64)
        mean = a.mean(0)
        _, s, vh = np.linalg.svd(a - mean, full_matrices=False)
        rank = int((s > s[0] * 1e-10).sum()) if len(s) and s[0] > 0 else 0
        keep = vh[: min(n_components, rank)]
        train.append((a - mean) @ keep.T)
        test.append((x_test[:, t].astype(np.float64) - mean) @ keep.T)
    return np.concatenate(train, axis=1), np.concatenate(test, axis=1)

