"""The batched probe engine: every C (and every k, and every fold) of a logistic probe in one solve.

The original (reference B3, ``sae_probes.utils_training.find_best_reg``) fits one sklearn model per
(C, fold): 10 C values x up to 66 folds, then a refit, for every dataset, layer, SAE and k. Here all
of them are one batched problem in torch:

- **L2** (sklearn's ``C * sum(loss) + ||w||^2 / 2``, intercept unpenalised): damped Newton, batched
  over problems. When n < d the data are first rotated into their row space (thin SVD): the
  optimum's w lies in the span of the training rows, so solving in rank(X) <= n coordinates is
  exact, and a d x d Hessian is never formed.
- **L1** (``C * sum(loss) + ||w||_1``): FISTA (Beck & Teboulle 2009) with adaptive restart, one
  step size per problem from the largest singular value of its masked design.

Folds are masks over the training rows, so folds of unequal size batch together. Selection is the
original's: mean validation AUC per C over the folds that have both classes, first maximum, then a
refit on all training rows (solved in the same batch). n <= 3 uses C = 1 and the training AUC.
"""

from __future__ import annotations

import itertools
import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from saeflow.probing import newton_l1

# paper Table 5 / utils_training.find_best_reg
C_GRID = tuple(float(c) for c in np.logspace(5, -5, 10))


def cv_splits(y: np.ndarray, seed: int = 42) -> list[tuple[np.ndarray, np.ndarray]]:
    """The original's validation scheme (``get_cv`` + ``get_splits``) for training labels ``y``.

    n <= 12: LeavePOut(2); n < 128: StratifiedKFold(6, shuffle, seed); else the last
    min(20%, 100) rows. Folds whose validation part lacks a class are dropped (not the holdout).
    """
    n = len(y)
    if n <= 12:
        folds = [(np.setdiff1d(np.arange(n), pair), np.array(pair))
                 for pair in itertools.combinations(range(n), 2)]
    elif n < 128:
        # StratifiedKFold itself warns, as in the original, when a class has fewer than 6 rows.
        kfold = StratifiedKFold(n_splits=6, shuffle=True, random_state=seed)
        folds = list(kfold.split(np.zeros(n), y))
    else:
        val = min(int(0.2 * n), 100)
        return [(np.arange(n - val), np.arange(n - val, n))]
    return [(tr, va) for tr, va in folds if len(np.unique(y[va])) == 2]


def auc(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ROC-AUC of each row of ``scores`` [p, n] against labels ``y`` [n] (ties count one half).

    Mann-Whitney U from average ranks, as sklearn's ``roc_auc_score``.
    """
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    order = scores.argsort(dim=1)
    sorted_scores = scores.gather(1, order)
    ranks = torch.empty_like(scores, dtype=torch.float64)
    for row in range(scores.shape[0]):
        _, inverse, counts = torch.unique_consecutive(sorted_scores[row], return_inverse=True,
                                                      return_counts=True)
        ends = counts.cumsum(0).double()
        average = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
        ranks[row, order[row]] = average[inverse]
    pos_rank_sum = (ranks * y.double()).sum(dim=1)
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _logloss(z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # sum over masked rows of log(1 + e^z) - y z, stable; z, mask [p, n], y [n] -> [p]
    return ((torch.nn.functional.softplus(z) - y * z) * mask).sum(dim=1)


class Fit(NamedTuple):
    """Batched logistic fits."""

    coef: torch.Tensor
    """[p, d] weights per problem."""
    intercept: torch.Tensor
    """[p] intercepts."""


def fit_l2(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cs: torch.Tensor,
           max_iter: int = 100, gtol: float = 1e-8, init: Fit | None = None) -> Fit:
    """L2 logistic regression for p problems sharing rows ``x`` [n, d], labels ``y`` [n].

    ``mask`` [p, n] in {0, 1} picks each problem's rows, ``cs`` [p] its C; ``init`` (p rows)
    is a starting point. Without it the problems are solved along a regularisation path: C in
    ascending order (all problems of one C in one batch), each from the solution of the next
    smaller C on the same rows (zero for the smallest), as glmnet does. Everything is float64,
    the Hessian too: on raw residual-stream activations at C = 1e5 it is ill-conditioned
    (rcond ~1e-10), and a float32 Hessian's Newton directions stalled 0.16% above the optimum's
    objective on 87_glue_cola, 0.02 of test AUC away (``benchmarks/check_probe_convergence.py``).
    A problem stops once the largest gradient component of its objective divided by
    C * n_rows (sklearn's scale: it minimises the mean loss) is at most ``gtol``. The default
    1e-8 is the optimum to AUC precision; sklearn's lbfgs as the original runs it (tol 1e-4,
    max_iter 1000) stops short of it on nearly separable data at large C, by up to 0.04 of
    test AUC (``benchmarks/check_probe_convergence.py``).
    """
    x, y, mask, cs = x.double(), y.double(), mask.double(), cs.double()
    if x.shape[0] < x.shape[1]:  # wide: solve in the row space of x, where every optimum lies
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        basis = vh[s > s[0] * 1e-10].T if len(s) else vh.T  # [d, r]
    else:  # tall: the row space is (almost surely) all of R^d, so no rotation
        basis = None
    z = x if basis is None else x @ basis  # [n, r]
    za = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)  # [n, r + 1]
    p, r1 = len(cs), za.shape[1]
    theta = torch.zeros(p, r1, dtype=z.dtype)
    if init is not None:  # the optimum's coordinates lie in the row space: project onto it
        theta[:, :-1] = init.coef.double() if basis is None else init.coef.double() @ basis
        theta[:, -1] = init.intercept.double()
    reg = torch.ones(r1, dtype=z.dtype)
    reg[-1] = 0.0  # the intercept is not penalised (sklearn)
    scale = cs * mask.sum(dim=1)  # [p]

    def objective(th: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return cs[rows] * _logloss(th @ za.T, y, mask[rows]) + 0.5 * (th[:, :-1] ** 2).sum(dim=1)

    def newton(active: torch.Tensor) -> None:
        """Damped Newton on the ``active`` problems of ``theta``, in place."""
        for _ in range(max_iter):
            rows = active.nonzero().squeeze(1)
            th, mk, cc = theta[rows], mask[rows], cs[rows]
            prob = torch.sigmoid(th @ za.T)  # [a, n]
            grad = cc[:, None] * (((prob - y) * mk) @ za) + th * reg  # [a, r1]
            small = grad.abs().amax(dim=1) / scale[rows] <= gtol
            active[rows[small]] = False
            if small.all():
                return
            keep = ~small
            rows, th, grad = rows[keep], th[keep], grad[keep]
            weight = cs[rows, None] * prob[keep] * (1 - prob[keep]) * mask[rows]  # [a, n]
            hess = (za.T * weight[:, None, :]) @ za  # [a, r1, r1]
            hess += torch.diag_embed(reg + 1e-10)
            step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
            # Backtracking per problem: the largest t in 1, 1/2, ... not raising the objective.
            obj = objective(th, rows)
            t = torch.ones(len(rows), dtype=z.dtype)
            new = objective(th - t[:, None] * step, rows)
            for _ in range(30):
                bad = new > obj
                if not bad.any():
                    break
                t = torch.where(bad, t / 2, t)
                new = torch.where(bad, objective(th - t[:, None] * step, rows), new)
            theta[rows] = th - t[:, None] * step

    if init is not None:
        newton(torch.ones(p, dtype=torch.bool))
    else:  # a regularisation path: C ascending, each C's problems from the last C's solutions
        group = torch.unique(mask, dim=0, return_inverse=True)[1]  # problems of the same rows
        last: dict[int, int] = {}
        for c in torch.unique(cs):  # ascending
            rows = (cs == c).nonzero().squeeze(1)
            for i in rows.tolist():
                g = int(group[i])
                if g in last:
                    theta[i] = theta[last[g]]
                last[g] = i
            active = torch.zeros(p, dtype=torch.bool)
            active[rows] = True
            newton(active)
    coef = theta[:, :-1] if basis is None else theta[:, :-1] @ basis.T
    return Fit(coef.float(), theta[:, -1].float())


SPARSE_DENSITY = 0.1
"""Below this share of nonzeros, :func:`fit_l1` multiplies by ``x`` as a sparse CSR matrix."""


class _Design:
    """The two products of a FISTA step with ``x`` [n, d]: dense, or CSR when ``x`` is sparse
    (SAE latents: ~2% nonzero among the top 512, so ~50x fewer multiply-adds)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.sparse = x.numel() > 0 and float((x != 0).double().mean()) < SPARSE_DENSITY
        if self.sparse:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self.rows = x.to_sparse_csr()  # [n, d]
            self.cols = x.T.contiguous().to_sparse_csr()  # [d, n]

    def margins(self, w: torch.Tensor) -> torch.Tensor:
        """``w @ x.T`` [p, n] for weights ``w`` [p, d]."""
        return (self.rows @ w.T).T if self.sparse else w @ self.x.T

    def back(self, r: torch.Tensor) -> torch.Tensor:
        """``r @ x`` [p, d] for row weights ``r`` [p, n]."""
        return (self.cols @ r.T).T if self.sparse else r @ self.x


def fit_l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cs: torch.Tensor,
           features: torch.Tensor | None = None, max_iter: int = 10000, tol: float = 1e-8,
           init: Fit | None = None) -> Fit:
    """L1 logistic regression for p problems; ``features`` [p, d] masks columns per problem,
    ``init`` (p rows) is a starting point (zero otherwise).

    Each problem minimises ``C * sum(loss) + ||w||_1`` over its rows and its columns (zero weight
    elsewhere), the problem of sklearn's saga and liblinear on the same sub-matrix. Problems with
    at least as many rows as columns are solved by orthant-wise Newton (:mod:`.newton_l1`), per
    column set; without ``init``, along a regularisation path as :func:`fit_l2` (C ascending, each
    from the next smaller C's solution on the same rows). The rest, and any problem Newton leaves
    unconverged, are solved (from where Newton stopped) by :func:`fista_l1` with ``max_iter`` and
    ``tol``. With k columns and n rows, a Newton step costs a k x k Cholesky factorisation: with
    k > n the Hessian is singular and the optimum not unique, where FISTA's cheap steps win.
    """
    x, y, mask, cs = x.double(), y.double(), mask.double(), cs.double()
    p, d = len(cs), x.shape[1]
    fmask = torch.ones(p, d, dtype=torch.bool) if features is None else features.bool()
    w = torch.zeros(p, d, dtype=x.dtype) if init is None else init.coef.double() * fmask
    b = torch.zeros(p, dtype=x.dtype) if init is None else init.intercept.double().clone()
    pending = torch.ones(p, dtype=torch.bool)
    masks, which = torch.unique(fmask, dim=0, return_inverse=True)
    same_rows = torch.unique(mask, dim=0, return_inverse=True)[1]
    for g, cols_mask in enumerate(masks):
        cols, probs = cols_mask.nonzero().squeeze(1), (which == g).nonzero().squeeze(1)
        if len(cols) + 1 > int(mask[probs].sum(dim=1).min()):
            continue  # wide: FISTA
        design = newton_l1.Design(x[:, cols])
        # batches: all at once from init, or one C at a time along the path
        batches = [probs] if init is not None else [probs[cs[probs] == c]
                                                    for c in torch.unique(cs[probs])]
        last: dict[int, int] = {}
        for batch in batches:
            for i in batch.tolist():
                if (prev := last.get(int(same_rows[i]))) is not None:
                    w[i], b[i] = w[prev], b[prev]
                last[int(same_rows[i])] = i
            start = torch.cat([w[batch][:, cols], b[batch, None]], dim=1)
            sol, done = newton_l1.fit(design, y, mask[batch], cs[batch], start)
            w[batch[:, None], cols] = sol[:, :-1]
            b[batch] = sol[:, -1]
            pending[batch[done]] = False
    if pending.any():
        rest = pending.nonzero().squeeze(1)
        fit = fista_l1(x, y, mask[rest], cs[rest], fmask[rest], max_iter, tol,
                       Fit(w[rest], b[rest]))
        w[rest], b[rest] = fit.coef.double(), fit.intercept.double()
    return Fit(w.float(), b.float())


def fista_l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cs: torch.Tensor,
             features: torch.Tensor | None = None, max_iter: int = 10000, tol: float = 1e-8,
             init: Fit | None = None) -> Fit:
    """L1 logistic regression by FISTA with backtracking, the arguments as :func:`fit_l1`.

    A problem stops (and leaves the batch) once one step changes its objective by at most ``tol``
    relative.

    Steps: each problem keeps its own curvature estimate ``lip``, shrunk by 1.5 every iteration and
    doubled (up to the global Lipschitz bound ``C * sigma_max([x_cols, 1])^2 / 4``) until the
    step satisfies the sufficient-decrease test of Beck & Teboulle's backtracking. The global
    bound alone is far too cautious at large C: near separation the logistic curvature
    ``p(1 - p)`` is much smaller than 1/4, and fixed steps at the bound left the objective
    4.5-400x above the optimum after 2,000 iterations on SAE latents at C >= 600
    (``benchmarks/check_probe_convergence.py --l1``). Margins are carried along (``x @ v`` of the
    momentum point is a combination of the last two iterates' margins), so an iteration costs two
    products with ``x`` plus one per rejected step.
    """
    x, y, mask, cs = x.double(), y.double(), mask.double(), cs.double()
    n, d = x.shape
    p = len(cs)
    fmask = torch.ones(p, d, dtype=x.dtype) if features is None else features.double()
    # The global Lipschitz bound of the smooth part, per distinct column mask: C / 4 times the
    # largest eigenvalue of the problem's block of the Gram matrix of [x, 1].
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    gram = xa.T @ xa
    masks, which = torch.unique(fmask, dim=0, return_inverse=True)
    sq_sigma = torch.stack([
        torch.linalg.eigvalsh(gram[cols][:, cols])[-1]
        for cols in (torch.cat([m.nonzero().squeeze(1), torch.tensor([d])]) for m in masks)
    ])  # fmt: skip
    bound_all = cs * sq_sigma[which] / 4  # [p]
    w_out, b_out = torch.zeros(p, d, dtype=x.dtype), torch.zeros(p, dtype=x.dtype)
    rows = torch.arange(p)
    if init is not None:
        w_out, b_out = init.coef.double() * fmask, init.intercept.double().clone()
    w, b = w_out.clone(), b_out.clone()
    design = _Design(x)
    z = design.margins(w) + b[:, None]  # margins of (w, b)
    vw, vb, vz = w.clone(), b.clone(), z.clone()  # the momentum point and its margins
    momentum = torch.ones(p, dtype=x.dtype)
    cc, mk, fm, bound = cs, mask, fmask, bound_all
    lip = bound / 1000

    def smooth(zz, c_, m_):
        return c_ * _logloss(zz, y, m_)

    obj = smooth(z, cc, mk) + w.abs().sum(dim=1)
    for _ in range(max_iter):
        resid = cc[:, None] * (torch.sigmoid(vz) - y) * mk  # [a, n]
        gw, gb = design.back(resid) * fm, resid.sum(dim=1)
        f_v = smooth(vz, cc, mk)

        # The proximal-gradient step from the momentum point; backtracking doubles lip (halves
        # the step) of the problems ``sel`` whose step failed the sufficient-decrease test.
        # (the first pass fills every row)
        new_w, new_b = torch.empty_like(vw), torch.empty_like(vb)
        new_z, f_new = torch.empty_like(vz), torch.empty_like(f_v)
        sel = torch.arange(len(cc))
        for _ in range(60):
            t = 1 / lip[sel]
            uw = vw[sel] - t[:, None] * gw[sel]
            nw = torch.sign(uw) * torch.clamp(uw.abs() - t[:, None], min=0) * fm[sel]
            nb = vb[sel] - t * gb[sel]
            nz = design.margins(nw) + nb[:, None]
            fn = smooth(nz, cc[sel], mk[sel])
            dw, db = nw - vw[sel], nb - vb[sel]
            model = (f_v[sel] + (gw[sel] * dw).sum(dim=1) + gb[sel] * db
                     + lip[sel] / 2 * ((dw * dw).sum(dim=1) + db * db))
            new_w[sel], new_b[sel], new_z[sel], f_new[sel] = nw, nb, nz, fn
            bad = (fn > model + 1e-12 * model.abs()) & (lip[sel] < bound[sel])
            if not bad.any():
                break
            sel = sel[bad]
            lip[sel] = torch.minimum(2 * lip[sel], bound[sel])
        new_obj = f_new + new_w.abs().sum(dim=1)
        # Adaptive restart (O'Donoghue & Candes 2015): drop momentum where the objective rose.
        restart = new_obj > obj
        next_m = (1 + torch.sqrt(1 + 4 * momentum**2)) / 2
        beta = torch.where(restart, torch.zeros_like(momentum), (momentum - 1) / next_m)
        vw = new_w + beta[:, None] * (new_w - w)
        vb = new_b + beta * (new_b - b)
        vz = new_z + beta[:, None] * (new_z - z)
        momentum = torch.where(restart, torch.ones_like(momentum), next_m)
        converged = (obj - new_obj).abs() <= tol * (1 + obj.abs())
        w, b, z, obj = new_w, new_b, new_z, torch.minimum(obj, new_obj)
        lip = lip / 1.5  # try a longer step next time
        if converged.any():  # retire converged problems; the rest go on in a smaller batch
            w_out[rows[converged]], b_out[rows[converged]] = w[converged], b[converged]
            keep = ~converged
            if not keep.any():
                return Fit(w_out.float(), b_out.float())
            rows, w, b, z, obj = rows[keep], w[keep], b[keep], z[keep], obj[keep]
            vw, vb, vz, momentum = vw[keep], vb[keep], vz[keep], momentum[keep]
            cc, mk, fm, bound, lip = cc[keep], mk[keep], fm[keep], bound[keep], lip[keep]
    w_out[rows], b_out[rows] = w, b
    return Fit(w_out.float(), b_out.float())
