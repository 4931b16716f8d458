"""The batched probe engine against sklearn, on the same folds; the original's validation scheme."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from saeflow.probing import engine, newton_l1, probe

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n, d, seed, noise=1.0):
    rng = np.random.RandomState(seed)
    w = rng.randn(d)
    x = rng.randn(n, d).astype(np.float32)
    y = (x @ w / np.sqrt(d) + noise * rng.randn(n) > 0).astype(np.int64)
    return x, y


@pytest.mark.parametrize(("n", "folds"), [(10, 25), (60, 6), (200, 1), (1000, 1)])
def test_fold_counts_by_n(n, folds):
    y = np.arange(n) % 2
    splits = engine.cv_splits(y)
    # n <= 12: LeavePOut(2) keeps the 5 x 5 mixed pairs of 45; n < 128: 6 stratified folds.
    assert len(splits) == folds
    if n >= 128:
        val = min(int(0.2 * n), 100)
        np.testing.assert_array_equal(splits[0][1], np.arange(n - val, n))
    for tr, va in splits:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == n


def test_one_class_validation_folds_are_dropped():
    y = np.zeros(10, dtype=np.int64)
    y[3] = 1
    splits = engine.cv_splits(y)
    assert len(splits) == 9 and all(3 in va for _, va in splits)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.RandomState(1)
    y = rng.randint(0, 2, 50)
    scores = np.round(rng.randn(3, 50), 1)  # many ties
    got = engine.auc(torch.from_numpy(scores), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, [roc_auc_score(y, s) for s in scores], atol=1e-12)


def test_l2_matches_sklearn_lbfgs_coefficients():
    x, y = _data(300, 20, 0, noise=1.0)
    cs = [0.01, 0.1, 1.0]
    mask = torch.ones(len(cs), len(y))
    fit = engine.fit_l2(torch.from_numpy(x), torch.from_numpy(y).double(), mask,
                        torch.tensor(cs), gtol=1e-10)
    for i, c in enumerate(cs):
        ref = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-12).fit(x.astype(np.float64), y)
        np.testing.assert_allclose(fit.coef[i].numpy(), ref.coef_[0], rtol=1e-3, atol=1e-4)
        assert abs(fit.intercept[i].item() - ref.intercept_[0]) < 1e-3


def test_l2_in_the_row_space_when_n_below_d():
    x, y = _data(40, 100, 2, noise=2.0)
    fit = engine.fit_l2(torch.from_numpy(x), torch.from_numpy(y).double(),
                        torch.ones(1, 40), torch.tensor([0.1]), gtol=1e-10)
    ref = LogisticRegression(C=0.1, solver="newton-cholesky", tol=1e-12).fit(x.astype(np.float64), y)
    np.testing.assert_allclose(fit.coef[0].numpy(), ref.coef_[0], rtol=1e-3, atol=1e-4)


def test_l1_matches_sklearn_saga_with_masks():
    x, y = _data(200, 12, 3, noise=1.0)
    cs, k = [0.05, 0.5], 8
    features = torch.zeros(2, 12)
    features[:, :k] = 1
    fit = engine.fit_l1(torch.from_numpy(x), torch.from_numpy(y).double(), torch.ones(2, 200),
                        torch.tensor(cs), features=features, max_iter=20000, tol=1e-12)
    assert (fit.coef[:, k:] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i, c in enumerate(cs):
            ref = LogisticRegression(C=c, penalty="l1", solver="saga", tol=1e-10,
                                     max_iter=100000).fit(x[:, :k], y)
            np.testing.assert_allclose(fit.coef[i, :k].numpy(), ref.coef_[0], atol=2e-3)
            # the same sparsity pattern
            assert ((fit.coef[i, :k].abs() > 1e-6).numpy() == (np.abs(ref.coef_[0]) > 1e-6)).all()


def _latents(n, d, seed):
    """SAE-latent-like features: non-negative, ~10% nonzero, exponential magnitudes (mean 5),
    labels from 20 of them plus noise: nearly separable at large C, as the SAE probes at large k."""
    rng = np.random.RandomState(seed)
    x = (rng.rand(n, d) < 0.1) * rng.exponential(5.0, (n, d))
    w = np.zeros(d)
    w[:20] = rng.randn(20)
    y = (x @ w + 2.0 * rng.randn(n) > np.median(x @ w)).astype(np.int64)
    return x.astype(np.float32), y


def _l1_objective(x, y, w, b, c):
    z = x.astype(np.float64) @ w + b
    return c * np.sum(np.logaddexp(0, z) - y * z) + np.abs(w).sum()


def _liblinear(x, y, c):
    return LogisticRegression(C=c, penalty="l1", solver="liblinear", tol=1e-8, max_iter=1000,
                              intercept_scaling=100).fit(x.astype(np.float64), y)


@pytest.mark.parametrize("c", [1.0, 1e3, 1e5])
def test_l1_reaches_the_optimum_on_latent_like_data(c):
    """At large C on unscaled sparse latents, fixed 1/L steps stall far above the optimum (the
    engine's first FISTA: 11% above at C 1e3, 7.8x at 1e5). The engine's objective must be at
    most liblinear's converged one (whose intercept penalty of |b|/100 only raises it), and the
    orthant-wise Newton solver must meet its own decrement test (FISTA is only its fallback)."""
    x, y = _latents(400, 256, 5)
    ref = _liblinear(x, y, c)
    theirs = _l1_objective(x, y, ref.coef_[0], ref.intercept_[0], c)
    fit = engine.fit_l1(torch.from_numpy(x), torch.from_numpy(y).double(), torch.ones(1, 400),
                        torch.tensor([c]))
    ours = _l1_objective(x, y, fit.coef[0].double().numpy(), fit.intercept[0].item(), c)
    assert theirs * (1 - 1e-2) <= ours <= theirs * (1 + 1e-6)
    design = newton_l1.Design(torch.from_numpy(x))
    theta, done = newton_l1.fit(design, torch.from_numpy(y).double(),
                                torch.ones(1, 400, dtype=torch.float64),
                                torch.tensor([c], dtype=torch.float64),
                                torch.zeros(1, 257, dtype=torch.float64))
    assert done.all()
    newton = _l1_objective(x, y, theta[0, :-1].numpy(), theta[0, -1].item(), c)
    assert newton <= theirs * (1 + 1e-6)


def test_l1_wide_problems_reach_the_optimum():
    """More columns than rows: the Hessian is singular and the engine solves by FISTA."""
    x, y = _latents(120, 256, 8)
    c = 10.0
    fit = engine.fit_l1(torch.from_numpy(x), torch.from_numpy(y).double(), torch.ones(1, 120),
                        torch.tensor([c]))
    ref = _liblinear(x, y, c)
    ours = _l1_objective(x, y, fit.coef[0].double().numpy(), fit.intercept[0].item(), c)
    assert ours <= _l1_objective(x, y, ref.coef_[0], ref.intercept_[0], c) * (1 + 1e-4)


def test_sparse_pair_hessian_equals_the_dense_one():
    x, _ = _latents(50, 40, 9)
    x[7] = 0  # a row without nonzeros
    v = torch.rand(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    design = newton_l1.Design(torch.from_numpy(x))
    assert not design.dense
    xa = np.hstack([x.astype(np.float64), np.ones((50, 1))])
    for i in range(3):
        np.testing.assert_allclose(design.hessian(v)[i].numpy(), xa.T @ (v[i].numpy()[:, None] * xa),
                                   rtol=1e-12, atol=1e-12)


def test_validation_auc_on_saturated_float64_probabilities():
    """sklearn's predict_proba saturates to 1.0 above a margin of ~36.7 in float64, and the
    original selects C on AUCs with those ties: the engine must score the same probabilities
    (not margins, nor float32 probabilities, which saturate near 17)."""
    margins = np.array([20.0, 30.0, 36.0, 38.0, 40.0, 45.0, 50.0, 60.0])
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    x = torch.from_numpy(margins[:, None])
    proba = probe._proba(x, torch.ones(1, 1), torch.zeros(1))
    expected = 1 / (1 + np.exp(-margins))
    assert (expected[3:] == 1.0).all() and (expected[:3] < 1.0).all()
    np.testing.assert_array_equal(proba[0].numpy(), expected)
    got = float(engine.auc(proba, torch.from_numpy(y))[0])
    assert got == pytest.approx(roc_auc_score(y, expected), abs=1e-12)
    assert got < roc_auc_score(y, margins)  # the ties above 36.7 cost AUC


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_selection_agrees_with_converged_sklearn(penalty):
    x, y = _data(500, 16, 4, noise=1.5)
    ks = [2, 8, 16] if penalty == "l1" else None
    args = (x[:200], y[:200], x[200:], y[200:], penalty, ks)
    fast = probe.select_logreg(*args, backend="torch")
    ref = probe.select_logreg(*args, backend="sklearn-converged")
    for a, b in zip(fast, ref):
        assert a.C == b.C
        assert abs(a.test_auc - b.test_auc) <= 0.002


@pytest.mark.parametrize(("n", "penalty"), [(200, "l2"), (60, "l2"), (200, "l1"), (60, "l1")])
def test_selection_agrees_with_sklearn_on_the_same_folds(n, penalty):
    x, y = _data(n + 300, 16, 4, noise=1.5)
    ks = [2, 8, 16] if penalty == "l1" else None
    args = (x[:n], y[:n], x[n:], y[n:], penalty, ks)
    fast = probe.select_logreg(*args, backend="torch")
    ref = probe.select_logreg(*args, backend="sklearn")
    for a, b in zip(fast, ref):
        assert abs(a.test_auc - b.test_auc) <= 0.01
        assert abs(a.val_auc - b.val_auc) <= 0.01
    same_c = np.mean([a.C == b.C for a, b in zip(fast, ref)])
    assert same_c >= 0.5


def test_tiny_n_uses_c1_and_training_auc():
    x, y = _data(50, 4, 5)
    x3, y3 = x[:3], np.array([0, 1, 1])
    (m,) = probe.select_logreg(x3, y3, x[3:], y[3:])
    assert m.C == 1.0 and 0 <= m.val_auc <= 1


def test_seeded_runs_are_identical():
    x, y = _data(160, 16, 6)
    a = probe.select_logreg(x[:60], y[:60], x[60:], y[60:], seed=7)
    b = probe.select_logreg(x[:60], y[:60], x[60:], y[60:], seed=7)
    assert a == b


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_warm_start_reaches_the_cold_start_optimum(penalty):
    """The refit starts from a fold's fit: a start elsewhere must not change the optimum."""
    x, y = _data(240, 16, 7, noise=1.0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).double()
    start = engine.Fit(torch.randn(1, 16, generator=torch.Generator().manual_seed(0)),
                       torch.tensor([2.0]))
    ones, c = torch.ones(1, 240), torch.tensor([0.3])
    if penalty == "l2":
        cold = engine.fit_l2(xt, yt, ones, c, gtol=1e-10)
        warm = engine.fit_l2(xt, yt, ones, c, gtol=1e-10, init=start)
    else:
        cold = engine.fit_l1(xt, yt, ones, c, max_iter=20000, tol=1e-12)
        warm = engine.fit_l1(xt, yt, ones, c, max_iter=20000, tol=1e-12, init=start)
    np.testing.assert_allclose(warm.coef.numpy(), cold.coef.numpy(), atol=1e-4)
    assert abs(warm.intercept.item() - cold.intercept.item()) < 1e-4
