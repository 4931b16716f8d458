"""Train/test splits of the probing regimes (reference B4), every one seeded.

- normal: n_train = min(n - 100, 1024) balanced 50/50; test = every other row, in its own
  balance (the original forced a 50/50 test set and crashed on unbalanced data, B9.9).
- scarcity: n_train from ``values`` (the paper's 20 sizes), balanced; the same test rows as normal.
- imbalance: positive fraction f of ``values`` in train and test (as the original), n_train =
  min(max_total - 100, 1024) where max_total is the most rows every fraction allows.
- label_noise: the normal split with exactly int(n_train * f) training labels flipped.
- ood: min(n, 1024) balanced training rows of the dataset (the original: 1024 of its first 1500
  rows, ``get_OOD_traintest``), tested on every row of its OOD set (:func:`ood_split`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SCARCITY = (2, 3, 4, 5, 7, 10, 14, 20, 28, 38, 53, 74, 103, 143, 198, 275, 382, 531, 737, 1024)
IMBALANCE = tuple(round(f, 2) for f in np.linspace(0.05, 0.95, 19))
LABEL_NOISE = tuple(round(f, 2) for f in np.linspace(0, 0.5, 11))
REGIMES = ("normal", "scarcity", "imbalance", "label_noise", "ood")


class Split(NamedTuple):
    """One seeded split."""

    value: float
    """The regime's value (n_train, positive fraction or flip fraction; 0 for normal)."""
    train: np.ndarray
    """Training row indices."""
    test: np.ndarray
    """Test row indices (of the OOD set in the ood regime)."""
    y_train: np.ndarray
    """Training labels as used (flipped under label noise)."""


def balanced_indices(y: np.ndarray, n: int, pos_ratio: float, rng: np.random.RandomState,
                     pool: np.ndarray | None = None) -> np.ndarray:
    """``n`` rows of ``pool`` with ceil(pos_ratio * n) positives (the original's sampler)."""
    pool = np.arange(len(y)) if pool is None else pool
    pos, neg = pool[y[pool] == 1], pool[y[pool] == 0]
    n_pos = int(np.ceil(pos_ratio * n))
    if n_pos > len(pos) or n - n_pos > len(neg):
        raise ValueError(f"cannot draw {n} rows with {n_pos} positives from {len(pos)} positive "
                         f"and {len(neg)} negative rows")
    chosen = np.concatenate([rng.choice(pos, n_pos, replace=False),
                             rng.choice(neg, n - n_pos, replace=False)])
    return rng.permutation(chosen)


def normal_train_size(y: np.ndarray, max_train: int = 1024, min_test: int = 100) -> int:
    """min(n - min_test, max_train), and no more than a 50/50 draw allows."""
    minority = int(min(y.sum(), len(y) - y.sum()))
    return max(2, min(len(y) - min_test, max_train, 2 * minority))


def flip_labels(y: np.ndarray, frac: float, seed: int = 42) -> np.ndarray:
    """Exactly int(len(y) * frac) labels flipped, at seeded positions (``corrupt_ytrain``)."""
    if not 0 <= frac <= 0.5:
        raise ValueError(f"label-noise fraction {frac} must be in [0, 0.5]")
    rng = np.random.RandomState(seed)
    flip = rng.choice(len(y), size=int(len(y) * frac), replace=False)
    out = y.copy()
    out[flip] = 1 - out[flip]
    return out


def splits(y: np.ndarray, regime: str, values: tuple[float, ...] = (), seed: int = 42,
           max_train: int = 1024, min_test: int = 100) -> list[Split]:
    """Every split of ``regime`` for labels ``y``; values that the data cannot supply are skipped."""
    rng = np.random.RandomState(seed)
    n_train = normal_train_size(y, max_train, min_test)
    train = balanced_indices(y, n_train, 0.5, rng)
    test = np.setdiff1d(np.arange(len(y)), train)
    if regime == "normal":
        return [Split(0, train, test, y[train])]
    if regime == "label_noise":
        return [Split(f, train, test, flip_labels(y[train], f, seed)) for f in values]
    out = []
    if regime == "scarcity":
        for n in values:
            if n <= n_train and n >= 2:
                sub = balanced_indices(y, int(n), 0.5, np.random.RandomState(seed), pool=train)
                out.append(Split(n, sub, test, y[sub]))
        return out
    if regime == "imbalance":
        pos, neg = int(y.sum()), len(y) - int(y.sum())
        total = int(min(neg / (1 - min(values)), pos / max(values)))
        n_tr = min(total - min_test, max_train)
        for f in values:
            r = np.random.RandomState(seed)
            tr = balanced_indices(y, n_tr, f, r)
            te = balanced_indices(y, max(total - n_tr - 1, 2), f, r,
                                  pool=np.setdiff1d(np.arange(len(y)), tr))
            out.append(Split(f, tr, te, y[tr]))
        return out
    if regime == "ood":
        raise ValueError("the ood regime tests on another set: use ood_split")
    raise ValueError(f"unknown regime '{regime}'; expected one of {', '.join(REGIMES)}")


def ood_split(y: np.ndarray, n_ood: int, seed: int = 42, max_train: int = 1024) -> Split:
    """The OOD regime: a balanced draw of min(n, max_train) training rows of the in-distribution
    labels ``y`` (no in-distribution test rows), tested on all ``n_ood`` rows of the OOD set."""
    if n_ood < 2:
        raise ValueError(f"an OOD set of {n_ood} rows cannot be scored; need at least 2")
    train = balanced_indices(y, normal_train_size(y, max_train, min_test=0), 0.5,
                             np.random.RandomState(seed))
    return Split(0, train, np.arange(n_ood), y[train])
