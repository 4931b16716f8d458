"""Dark-matter math: streaming regression vs float64 lstsq, power-law recovery, pursuit, error split.

Every RNG is seeded by the autouse fixture in conftest.py; the generators below are seeded too.
"""

import json

import h5py
import numpy as np
import pytest
import torch

from saeflow import h5io
from saeflow.dark_matter.error_split import main as error_split_main
from saeflow.dark_matter.power_law import fit_power_law, power_law
from saeflow.dark_matter.pursuit import gradient_pursuit
from saeflow.dark_matter.regression import (
    NormalEquations,
    R2Accumulator,
    predict,
    split_mask,
)
from saeflow.metrics import fvu

# Tiny shapes: OpenMP hand-offs cost more than they save (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- streaming regression


def _linear_data(n=2000, d_in=12, d_out=5, noise=0.3, seed=0):
    """x with large, unequal means (like residual streams) and y = x A + b + noise, float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * torch.linspace(0.5, 3, d_in) + 40 * torch.randn(
        d_in, generator=g)
    a, b = torch.randn(d_in, d_out, generator=g), 5 * torch.randn(d_out, generator=g)
    y = x @ a + b + noise * torch.randn(n, d_out, generator=g)
    return x.float(), y.float(), a, b


def _numpy_lstsq(x, y, intercept=True):
    x64, y64 = x.double().numpy(), y.double().numpy()
    if intercept:
        x64 = np.hstack([x64, np.ones((len(x64), 1))])
    sol = np.linalg.lstsq(x64, y64, rcond=None)[0]
    return (sol[:-1], sol[-1]) if intercept else (sol, np.zeros(y64.shape[1]))


def _numpy_r2(y, y_hat):
    y, y_hat = y.double().numpy(), y_hat.double().numpy()
    ss_res = ((y - y_hat) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return 1 - ss_res / ss_tot, 1 - ss_res.sum() / ss_tot.sum()


def _accumulate(x, y, sizes):
    normal, start = NormalEquations(x.shape[1], y.shape[1]), 0
    for size in sizes:
        normal.update(x[start : start + size], y[start : start + size])
        start += size
    assert start == len(x)
    return normal


UNEVEN = [1, 7, 500, 1492]


@pytest.mark.parametrize("sizes", [[2000], UNEVEN])
def test_streaming_fit_matches_float64_lstsq_with_bias(sizes):
    x, y, _, _ = _linear_data()
    weight, bias = _numpy_lstsq(x, y)
    fit = _accumulate(x, y, sizes).solve()
    assert fit.solver == "cholesky"
    np.testing.assert_allclose(fit.weight.numpy(), weight, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.bias.numpy(), bias, rtol=1e-6)


def test_chunking_does_not_change_the_fit():
    x, y, _, _ = _linear_data()
    whole, pieces = _accumulate(x, y, [2000]).solve(), _accumulate(x, y, UNEVEN).solve()
    torch.testing.assert_close(pieces.weight, whole.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pieces.bias, whole.bias, rtol=1e-10, atol=1e-10)


def test_streaming_r2_matches_numpy_on_held_out_rows_and_in_sample():
    x, y, _, _ = _linear_data(n=3000, noise=3.0)
    is_test = split_mask(3000, 0.4, seed=3)
    normal = _accumulate(x[~is_test], y[~is_test], [1, 7, 500, int((~is_test).sum()) - 508])
    fit = normal.solve()
    acc = R2Accumulator(y.shape[1])
    test_rows = is_test.nonzero().squeeze(1)
    for chunk in [test_rows[:1], test_rows[1:8], test_rows[8:700], test_rows[700:]]:
        acc.update(y[chunk], predict(fit, x[chunk]))
    per_dim, pooled = _numpy_r2(y[is_test], predict(fit, x[is_test]))
    result = acc.result()
    np.testing.assert_allclose(result.per_dim.numpy(), per_dim, rtol=1e-6)
    assert result.mean == pytest.approx(per_dim.mean(), rel=1e-6)
    assert result.pooled == pytest.approx(pooled, rel=1e-6)
    assert result.fvu == pytest.approx(1 - pooled, rel=1e-6)
    train_dims, train_pooled = _numpy_r2(y[~is_test], predict(fit, x[~is_test]))
    in_sample = normal.r2(fit)
    np.testing.assert_allclose(in_sample.per_dim.numpy(), train_dims, rtol=1e-6)
    assert in_sample.pooled == pytest.approx(train_pooled, rel=1e-6)
    assert 0.3 < result.mean < 0.999  # noisy enough that R² is a real test


def test_fit_without_intercept_matches_lstsq_through_origin():
    x, y, _, _ = _linear_data()
    weight, _ = _numpy_lstsq(x, y, intercept=False)
    fit = _accumulate(x, y, UNEVEN).solve(intercept=False)
    np.testing.assert_allclose(fit.weight.numpy(), weight, rtol=1e-6, atol=1e-9)
    assert float(fit.bias.abs().max()) == 0.0
    per_dim, _ = _numpy_r2(y, x.double() @ torch.from_numpy(weight))
    np.testing.assert_allclose(_accumulate(x, y, UNEVEN).r2(fit).per_dim.numpy(), per_dim,
                               rtol=1e-6)


def test_ridge_matches_closed_form_on_centred_data():
    x, y, _, _ = _linear_data(n=300)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    expected = torch.linalg.solve(xc.T @ xc + 50.0 * torch.eye(x.shape[1]), xc.T @ yc)
    fit = _accumulate(x, y, [100, 200]).solve(ridge=50.0)
    torch.testing.assert_close(fit.weight, expected, rtol=1e-8, atol=1e-10)


def test_singular_systems_fall_back_to_a_least_squares_solution():
    x, y, _, _ = _linear_data(n=400, d_in=6)
    x = torch.cat([x, x[:, :2] * 2 - 1], dim=1)  # two columns are affine copies of others
    fit = _accumulate(x, y, [13, 387]).solve()
    weight, bias = _numpy_lstsq(x, y)
    assert fit.solver == "eigh-pinv"
    reference = x.double().numpy() @ weight + bias  # fitted values are unique even when W is not
    np.testing.assert_allclose(predict(fit, x).numpy(), reference, rtol=1e-6, atol=1e-6)
    few = _accumulate(x[:5], y[:5], [5]).solve()  # fewer rows than dims
    assert few.solver == "eigh-pinv" and torch.isfinite(few.weight).all()


def test_r2_of_a_constant_dim_is_nan_and_left_out_of_the_mean():
    y = torch.randn(50, 3, dtype=torch.float64)
    y[:, 1] = 2.0
    acc = R2Accumulator(3)
    acc.update(y, y * 0.5)
    result = acc.result()
    assert torch.isnan(result.per_dim[1])
    assert result.mean == pytest.approx(float(result.per_dim[[0, 2]].mean()))


def test_split_mask_is_seeded_and_sized():
    a, b, c = split_mask(1001, 0.3, 7), split_mask(1001, 0.3, 7), split_mask(1001, 0.3, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.sum()) == round(1001 * 0.3) and a.dtype == torch.bool
    with pytest.raises(ValueError, match="test_fraction"):
        split_mask(10, 1.5, 0)


# ---------------------------------------------------------------- power law

WIDTHS = 2.0 ** np.arange(12, 21)


def test_power_law_recovers_exact_parameters():
    fit = fit_power_law(WIDTHS, power_law(WIDTHS, 3.0, 0.4, 0.12), n_boot=0)
    assert (fit.a, fit.m, fit.c) == pytest.approx((3.0, 0.4, 0.12), rel=1e-6)
    assert fit.rmse < 1e-9


def test_power_law_recovers_parameters_from_noisy_points():
    rng = np.random.default_rng(1)
    truth = (3.0, 0.4, 0.12)
    y = power_law(WIDTHS, *truth) * (1 + 0.002 * rng.standard_normal(len(WIDTHS)))
    fit = fit_power_law(WIDTHS, y, n_boot=100, seed=0)
    assert fit.m == pytest.approx(0.4, abs=0.03)
    assert fit.c == pytest.approx(0.12, rel=0.02)
    assert fit.a == pytest.approx(3.0, rel=0.25)
    for value, (lo, hi), true in zip((fit.a, fit.m, fit.c), (fit.a_ci, fit.m_ci, fit.c_ci), truth):
        assert lo <= value <= hi
        assert lo - 3 * (hi - lo) < true < hi + 3 * (hi - lo)
    assert fit.m_std > 0 and fit.c_std > 0


def test_power_law_is_deterministic_under_a_seed():
    rng = np.random.default_rng(2)
    y = power_law(WIDTHS, 1.0, 0.3, 0.05) + 1e-4 * rng.standard_normal(len(WIDTHS))
    first = fit_power_law(WIDTHS, y, n_boot=50, seed=5)
    again = fit_power_law(WIDTHS, y, n_boot=50, seed=5)
    other = fit_power_law(WIDTHS, y, n_boot=50, seed=6)
    assert first == again
    assert (other.a, other.m, other.c) == (first.a, first.m, first.c)  # the fit needs no seed
    assert other.m_std != first.m_std  # the bootstrap does


def test_power_law_parameters_stay_non_negative():
    y = power_law(WIDTHS, 2.0, 0.3, -0.05)  # a negative asymptote is not allowed
    fit = fit_power_law(WIDTHS, y, n_boot=20)
    assert min(fit.a, fit.m, fit.c) >= 0 and fit.c == 0.0
    flat = fit_power_law(WIDTHS, np.full(len(WIDTHS), 0.2), n_boot=0)
    assert flat.c == pytest.approx(0.2) and flat.rmse < 1e-12


# ---------------------------------------------------------------- gradient pursuit


def _sparse_signals(w_dec, b_dec, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(w_dec.shape[0], generator=g)[:k] for _ in range(n)])
    val = 1 + torch.rand(n, k, generator=g)
    return b_dec + torch.einsum("nk,nkd->nd", val, w_dec[idx]), idx, val


def test_pursuit_recovers_codes_exactly_on_an_orthonormal_dictionary():
    w_dec = torch.linalg.qr(torch.randn(64, 64))[0].T.contiguous()  # orthonormal rows
    b_dec = 0.1 * torch.randn(64)
    x, idx, val = _sparse_signals(w_dec, b_dec, n=100, k=4, seed=1)
    result = gradient_pursuit(w_dec, b_dec, x, torch.full((100,), 4), chunk_tokens=32)
    order_true, order_got = idx.argsort(1), result.indices.argsort(1)
    assert torch.equal(idx.gather(1, order_true), result.indices.gather(1, order_got))
    torch.testing.assert_close(result.values.gather(1, order_got), val.gather(1, order_true),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.reconstruction, x, atol=1e-5, rtol=1e-5)


def test_pursuit_recovers_supports_on_a_near_orthogonal_overcomplete_dictionary():
    w_dec = torch.nn.functional.normalize(torch.randn(512, 256), dim=1)
    b_dec = 0.1 * torch.randn(256)
    x, idx, _ = _sparse_signals(w_dec, b_dec, n=200, k=3, seed=2)
    result = gradient_pursuit(w_dec, b_dec, x, torch.full((200,), 3), chunk_tokens=64)
    recovered = [set(result.indices[t].tolist()) == set(idx[t].tolist()) for t in range(200)]
    assert np.mean(recovered) >= 0.95
    assert (result.values >= 0).all()
    rel_err = (result.reconstruction - x).norm(dim=1) / (x - b_dec).norm(dim=1)
    assert float(rel_err.median()) < 0.2


def test_pursuit_error_never_increases_as_l0_grows():
    w_dec = torch.nn.functional.normalize(torch.randn(300, 40), dim=1) * (0.5 + torch.rand(300, 1))
    b_dec, x = torch.randn(40), torch.randn(64, 40) * 3
    errors = []
    for l0 in range(16):
        result = gradient_pursuit(w_dec, b_dec, x, torch.full((64,), l0), chunk_tokens=20)
        assert (result.values >= 0).all() and ((result.indices >= 0).sum(1) <= l0).all()
        errors.append((result.reconstruction - x).pow(2).sum(1))
    errors = torch.stack(errors)  # [l0, token]
    torch.testing.assert_close(errors[0], (x - b_dec).pow(2).sum(1))
    assert (errors[1:] <= errors[:-1] * (1 + 1e-5) + 1e-6).all()
    assert float(errors[-1].mean()) < 0.5 * float(errors[0].mean())


def test_pursuit_stops_each_token_at_its_own_l0_and_ignores_chunking():
    w_dec = torch.nn.functional.normalize(torch.randn(128, 32), dim=1)
    b_dec, x = torch.randn(32), torch.randn(50, 32)
    target = torch.randint(0, 9, (50,))
    small = gradient_pursuit(w_dec, b_dec, x, target, chunk_tokens=7)
    big = gradient_pursuit(w_dec, b_dec, x, target, chunk_tokens=1000)
    torch.testing.assert_close(small.reconstruction, big.reconstruction)
    assert torch.equal(small.indices, big.indices)
    for t in [0, 13, 49]:
        alone = gradient_pursuit(w_dec, b_dec, x[t : t + 1], target[t : t + 1])
        torch.testing.assert_close(alone.reconstruction[0], big.reconstruction[t])
        assert int((big.indices[t] >= 0).sum()) <= int(target[t])


# ---------------------------------------------------------------- error split stage

N, D = 1500, 8


def _write_pair(tmp_path, x, sae_error, eval_tokens=None):
    """An activations file and an evaluation file in the layouts of h5io / sae_eval."""
    acts, sae_eval = tmp_path / "acts.h5", tmp_path / "eval.h5"
    tokens = np.arange(len(x), dtype=np.int32) % 97
    with h5py.File(acts, "w") as h5:
        h5["acts"], h5["tokens"] = x.numpy().astype(np.float32), tokens
        h5io.write_attrs(h5, {"site": "test", "d_model": x.shape[1]})
        h5io.mark_complete(h5)
    error = (-sae_error).numpy().astype(np.float32)  # the evaluation file stores Sae(x) - x
    with h5py.File(sae_eval, "w") as h5:
        h5["error"], h5["tokens"] = error, tokens if eval_tokens is None else eval_tokens
        h5["error_sq_norm"] = (error.astype(np.float64) ** 2).sum(1).astype(np.float32)
        h5["l0"] = np.full(len(x), 3, dtype=np.int32)
        h5io.write_attrs(h5, {"sae_id": "toy", "d_sae": 32})
        h5io.mark_complete(h5)
    return acts, sae_eval


def _run_stage(tmp_path, acts, sae_eval, *extra):
    out = {k: tmp_path / f"{k}.{ext}" for k, ext in
           [("split", "h5"), ("fit", "h5"), ("metrics", "json")]}
    error_split_main(["--acts", str(acts), "--sae-eval", str(sae_eval), "--out", str(out["split"]),
                      "--fit", str(out["fit"]), "--metrics", str(out["metrics"]),
                      "--chunk-tokens", "256", *extra])
    return out


def _toy_acts():
    return torch.randn(N, D) * 2 + torch.linspace(-5, 20, D)


def test_purely_linear_error_is_all_linear(tmp_path):
    x = _toy_acts()
    a, b = torch.randn(D, D) * 0.3, torch.randn(D)
    out = _run_stage(tmp_path, *_write_pair(tmp_path, x, x @ a + b))
    with h5io.H5File(out["split"]) as h5, h5io.H5File(out["fit"]) as fit_h5:
        scale = float((x @ a + b).abs().max())
        assert np.abs(h5["nonlinear"][:]).max() < 1e-5 * scale
        np.testing.assert_allclose(fit_h5["weight"][:], a.numpy(), atol=1e-4)
        np.testing.assert_allclose(fit_h5["bias"][:], b.numpy(), atol=1e-3)
    metrics = json.loads(out["metrics"].read_text())
    assert metrics["r2_mean"] > 1 - 1e-8 and metrics["r2_pooled"] > 1 - 1e-8
    assert min(metrics["r2_per_dim"]) > 1 - 1e-8
    assert metrics["fvu_nonlinear"] < 1e-10
    assert metrics["linear_norm_fraction"] == pytest.approx(1.0, abs=1e-6)


def test_linear_plus_nonlinear_is_the_error_and_metrics_match_direct_computation(tmp_path):
    x = _toy_acts()
    sae_error = 0.4 * x @ torch.randn(D, D) * 0.1 + torch.tanh(x) + 0.3 * torch.randn(N, D)
    acts, sae_eval = _write_pair(tmp_path, x, sae_error)
    out = _run_stage(tmp_path, acts, sae_eval, "--test-fraction", "0.4", "--seed", "3")
    sae_error = torch.from_numpy(-h5io.H5File(sae_eval)["error"][:])  # as stored, float32
    with h5io.H5File(out["split"]) as h5, h5io.H5File(out["fit"]) as fit_h5:
        linear, nonlinear = torch.from_numpy(h5["linear"][:]), torch.from_numpy(h5["nonlinear"][:])
        is_test = torch.from_numpy(h5["is_test"][:])
        weight, bias = torch.from_numpy(fit_h5["weight"][:]), torch.from_numpy(fit_h5["bias"][:])
        assert h5.attrs["complete"] == 1 and fit_h5.attrs["solver"] == "cholesky"
    torch.testing.assert_close(linear + nonlinear, sae_error, rtol=0, atol=4e-7 * 25)
    assert torch.equal(is_test, split_mask(N, 0.4, 3))
    train = ~is_test
    ref_w, ref_b = _numpy_lstsq(x[train], sae_error[train])
    np.testing.assert_allclose(weight.numpy(), ref_w, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(bias.numpy(), ref_b, rtol=1e-6, atol=1e-8)
    metrics = json.loads(out["metrics"].read_text())
    xt, et = x[is_test].double(), sae_error[is_test].double()
    pred = xt @ weight + bias
    per_dim, pooled = _numpy_r2(et, pred)
    np.testing.assert_allclose(metrics["r2_per_dim"], per_dim, rtol=1e-6)
    assert metrics["r2_mean"] == pytest.approx(per_dim.mean(), rel=1e-6)
    assert metrics["r2_pooled"] == pytest.approx(pooled, rel=1e-6)
    assert metrics["fvu_sae"] == pytest.approx(fvu(xt, xt - et), rel=1e-6)
    assert metrics["fvu_nonlinear"] == pytest.approx(fvu(xt, xt - et + pred), rel=1e-6)
    assert metrics["fvu_nonlinear"] < metrics["fvu_sae"]
    assert metrics["fvu_sae_all_rows"] == pytest.approx(fvu(x, x - sae_error), rel=1e-6)
    assert metrics["linear_norm_fraction"] == pytest.approx(
        float(pred.pow(2).sum() / et.pow(2).sum()), rel=1e-6)
    norm_sq = sae_error.double().pow(2).sum(1, keepdim=True)
    norm_fit = _numpy_lstsq(x[train], norm_sq[train])
    norm_pred = x[is_test].double().numpy() @ norm_fit[0] + norm_fit[1]
    assert metrics["norm_r2"] == pytest.approx(_numpy_r2(norm_sq[is_test],
                                                         torch.from_numpy(norm_pred))[1], rel=1e-6)
    assert metrics["n_test"] == int(is_test.sum()) and metrics["sae_id"] == "toy"


def test_mismatched_inputs_fail_with_the_file_named_and_no_outputs(tmp_path):
    x = _toy_acts()
    acts, sae_eval = _write_pair(tmp_path, x, torch.randn(N, D))
    with h5py.File(sae_eval, "a") as h5:
        del h5["error"]
        h5["error"] = np.zeros((N - 1, D), dtype=np.float32)
    with pytest.raises(h5io.InputFileError, match=r"eval\.h5: dataset 'error' has shape"):
        _run_stage(tmp_path, acts, sae_eval)
    wrong_tokens = np.arange(N, dtype=np.int32)[::-1].copy()
    acts, sae_eval = _write_pair(tmp_path, x, torch.randn(N, D), eval_tokens=wrong_tokens)
    with pytest.raises(h5io.InputFileError, match=r"eval\.h5: 'tokens' differ from .*acts\.h5"):
        _run_stage(tmp_path, acts, sae_eval)
    assert not any((tmp_path / name).exists() for name in ["split.h5", "fit.h5", "metrics.json"])
