"""Width power law of SAE error: FVU(W) = c + a·W^(-m) with a, m, c >= 0.

The Dark Matter code (``sae_power_laws.py``) fits |c| + |a|·W^(-|m|) with Adam (lr 1e-4, 50k
epochs, MSE) from one unseeded start. That is slow, can stop short of the minimum, and gives no
uncertainty. Here the fit is a *profile* least squares: for a fixed exponent m the model is
linear in (a, c), so the best non-negative (a, c) has a closed form (a 2-variable NNLS is the
best of at most three candidates: the unconstrained solution if it is non-negative, a alone,
c alone). The one nonlinear parameter m is then found by a dense grid over [0, m_max] followed
by golden-section refinement around the best grid point. This finds the global minimum up to
the grid spacing (no starting point, no learning rate, no local minima in the 2-D part), is
deterministic, and costs milliseconds.

Uncertainty: a seeded residual bootstrap (fixed widths, resampled residuals scaled by
sqrt(n / (n - 3)) for the 3 fitted parameters). A bootstrap over points would be degenerate
here: with the paper's 7 widths many resamples have fewer than 3 distinct widths.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

GOLDEN = (math.sqrt(5) - 1) / 2


class PowerLawFit(NamedTuple):
    """FVU(W) = c + a·W^(-m): least-squares estimates and residual-bootstrap uncertainty."""

    a: float  # amplitude, in FVU units at W = 1
    m: float  # exponent
    c: float  # asymptote: the FVU an infinitely wide SAE would keep
    rmse: float  # root mean squared residual of the fit
    a_std: float  # bootstrap standard deviations
    m_std: float
    c_std: float
    a_ci: tuple[float, float]  # 95% bootstrap percentile intervals
    m_ci: tuple[float, float]
    c_ci: tuple[float, float]
    n_boot: int
    seed: int


def power_law(width: np.ndarray, a: float, m: float, c: float) -> np.ndarray:
    """c + a·W^(-m), elementwise."""
    return c + a * np.asarray(width, dtype=np.float64) ** (-m)


def _nnls_given_m(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (a, c) >= 0 for y ≈ c + a·z, for each row of z [G, n]; returns (a, c, sse), each [G]."""
    zm, ym = z.mean(-1), y.mean(-1)
    szz = ((z - zm[:, None]) ** 2).sum(-1)
    szy = ((z - zm[:, None]) * (y - ym)).sum(-1)
    a_free = np.divide(szy, szz, out=np.zeros_like(szy), where=szz > 0)
    c_free = ym - a_free * zm
    a_only = np.maximum(np.divide((z * y).sum(-1), (z * z).sum(-1),
                                  out=np.zeros_like(zm), where=(z * z).sum(-1) > 0), 0.0)
    c_only = np.full_like(zm, max(float(ym), 0.0))
    cands_a = np.stack([a_free, a_only, np.zeros_like(zm)])
    cands_c = np.stack([c_free, np.zeros_like(zm), c_only])
    sse = (((cands_c[..., None] + cands_a[..., None] * z) - y) ** 2).sum(-1)
    sse = np.where((cands_a >= 0) & (cands_c >= 0), sse, np.inf)  # infeasible candidates
    best = sse.argmin(0)
    pick = np.arange(z.shape[0])
    return cands_a[best, pick], cands_c[best, pick], sse[best, pick]


def _profile_sse(m: float, logw: np.ndarray, y: np.ndarray) -> float:
    return float(_nnls_given_m(np.exp(-m * logw)[None], y)[2][0])


def _fit(logw: np.ndarray, y: np.ndarray, m_max: float, n_grid: int) -> tuple[float, float, float]:
    """(a', m, c) minimising SSE, with widths given as log(W / W_ref)."""
    grid = np.linspace(0.0, m_max, n_grid)
    _, _, sse = _nnls_given_m(np.exp(-grid[:, None] * logw[None, :]), y)
    i = int(sse.argmin())
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
    x1, x2 = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    f1, f2 = _profile_sse(x1, logw, y), _profile_sse(x2, logw, y)
    for _ in range(60):  # golden section: the bracket shrinks by 0.618 per step
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - GOLDEN * (hi - lo)
            f1 = _profile_sse(x1, logw, y)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + GOLDEN * (hi - lo)
            f2 = _profile_sse(x2, logw, y)
    m = grid[i] if sse[i] <= min(f1, f2) else (x1 if f1 <= f2 else x2)
    a, c, _ = _nnls_given_m(np.exp(-m * logw)[None], y)
    return float(a[0]), float(m), float(c[0])


def fit_power_law(width: np.ndarray, fvu: np.ndarray, *, m_max: float = 4.0, n_grid: int = 801,
                  n_boot: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit FVU(W) = c + a·W^(-m), a, m, c >= 0, to points (width [n], fvu [n]); n >= 3.

    ``m`` is searched in [0, m_max]. Widths are rescaled by their geometric mean internally
    (W^(-m) spans many orders of magnitude); ``a`` is reported for the original widths.
    """
    w, y = np.asarray(width, dtype=np.float64), np.asarray(fvu, dtype=np.float64)
    if w.ndim != 1 or w.shape != y.shape or len(w) < 3 or (w <= 0).any():
        raise ValueError(f"need >= 3 points with positive widths, got width {w.shape}, "
                         f"fvu {y.shape}")
    log_ref = float(np.log(w).mean())
    logw = np.log(w) - log_ref
    a_s, m, c = _fit(logw, y, m_max, n_grid)
    fitted = c + a_s * np.exp(-m * logw)
    resid = (y - fitted) * math.sqrt(len(y) / (len(y) - 3)) if len(y) > 3 else y - fitted
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, 3))
    for b in range(n_boot):
        a_b, m_b, c_b = _fit(logw, fitted + rng.choice(resid, size=len(y)), m_max, n_grid)
        boot[b] = a_b * math.exp(m_b * log_ref), m_b, c_b
    std = boot.std(0, ddof=1) if n_boot > 1 else np.full(3, np.nan)
    ci = np.percentile(boot, [2.5, 97.5], axis=0) if n_boot > 0 else np.full((2, 3), np.nan)
    return PowerLawFit(
        a=a_s * math.exp(m * log_ref), m=m, c=c,
        rmse=float(np.sqrt(np.mean((y - fitted) ** 2))),
        a_std=float(std[0]), m_std=float(std[1]), c_std=float(std[2]),
        a_ci=(float(ci[0, 0]), float(ci[1, 0])), m_ci=(float(ci[0, 1]), float(ci[1, 1])),
        c_ci=(float(ci[0, 2]), float(ci[1, 2])), n_boot=n_boot, seed=seed,
    )
