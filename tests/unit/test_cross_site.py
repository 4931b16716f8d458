"""Cross-site prediction (Figure 10b): planted relations give known R², and a numpy reference."""

import h5py
import numpy as np
import pandas as pd
import pytest

from saeflow import h5io
from saeflow.dark_matter import cross_site as cs
from saeflow.dark_matter.regression import split_mask

N, D = 900, 8


def _write(path, **datasets):
    with h5py.File(path, "w") as h5:
        for name, value in datasets.items():
            h5[name] = value
        h5io.mark_complete(h5)
    return str(path)


def _site(tmp_path, name, x, sae_error, linear, tokens):
    """Files of one site: activations, evaluation (error = Sae(x) - x = -SaeError), split."""
    f32 = np.float32
    return [name,
            _write(tmp_path / f"{name}_acts.h5", acts=x.astype(f32), tokens=tokens),
            _write(tmp_path / f"{name}_eval.h5", error=(-sae_error).astype(f32), tokens=tokens),
            _write(tmp_path / f"{name}_split.h5", linear=linear.astype(f32),
                   nonlinear=(sae_error - linear).astype(f32), tokens=tokens)]


@pytest.fixture
def planted(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.arange(N, dtype=np.int32)
    x_prev = rng.normal(size=(N, D))
    x = x_prev @ rng.normal(size=(D, D)) + 0.5  # the target site is a linear map of the previous
    linear = x @ rng.normal(size=(D, D)) * 0.3 + 0.1
    nonlinear = np.tanh(3 * x[:, ::-1]) * rng.normal(size=(N, 1))  # not linear in x
    target = _site(tmp_path, "resid", x, linear + nonlinear, linear, tokens)
    prev = _site(tmp_path, "resid_prev", x_prev, rng.normal(size=(N, D)), np.zeros((N, D)), tokens)
    noise = _site(tmp_path, "noise", rng.normal(size=(N, D)), rng.normal(size=(N, D)),
                  np.zeros((N, D)), tokens)
    args = ["--target-eval", target[2], "--target-split", target[3], "--out",
            str(tmp_path / "r.csv"), "--chunk-tokens", "128"]
    for site in (target, prev, noise):
        args += ["--source", *site]
    return args, x, linear, nonlinear


def test_planted_relations(planted):
    args, *_ = planted
    table = cs.run(cs.parse_args(args)).set_index(["source", "predictor", "target"])
    assert len(table) == 3 * 4 * 3
    r2 = table.r2
    # the linear error is linear in x, and x is linear in the previous residual
    assert r2["resid", "act", "linear_error"] == pytest.approx(1.0, abs=1e-6)
    assert r2["resid_prev", "act", "linear_error"] == pytest.approx(1.0, abs=1e-6)
    # each part predicts itself exactly; the nonlinear part is not linear in x
    assert r2["resid", "nonlinear_err", "nonlinear_error"] == pytest.approx(1.0, abs=1e-6)
    assert r2["resid", "act", "nonlinear_error"] < 0.5
    # an unrelated site explains nothing held out (R² near or below 0)
    assert r2["noise", "act", "sae_error"] < 0.05
    assert r2["noise", "sae_rec", "nonlinear_error"] < 0.05


def test_matches_a_numpy_least_squares_reference(planted):
    args, x, linear, nonlinear = planted
    table = cs.run(cs.parse_args(args)).set_index(["source", "predictor", "target"])
    is_test = split_mask(N, 0.5, 0).numpy()
    x32 = x.astype(np.float32).astype(np.float64)
    y = (linear + nonlinear).astype(np.float32).astype(np.float64)  # SaeError as stored
    design = np.hstack([x32, np.ones((N, 1))])
    coef, *_ = np.linalg.lstsq(design[~is_test], y[~is_test], rcond=None)
    resid = y[is_test] - design[is_test] @ coef
    ss_tot = ((y[is_test] - y[is_test].mean(0)) ** 2).sum(0)
    want = np.mean(1 - (resid**2).sum(0) / ss_tot)
    assert table.r2["resid", "act", "sae_error"] == pytest.approx(want, abs=1e-6)
    pooled = 1 - (resid**2).sum() / ss_tot.sum()
    assert table.r2_pooled["resid", "act", "sae_error"] == pytest.approx(pooled, abs=1e-6)


def test_sources_of_another_corpus_are_rejected(planted, tmp_path):
    args, *_ = planted
    other = _site(tmp_path, "other", np.zeros((N, D)), np.zeros((N, D)), np.zeros((N, D)),
                  np.arange(N, dtype=np.int32)[::-1].copy())
    with pytest.raises(h5io.InputFileError, match="tokens differ"):
        cs.run(cs.parse_args([*args, "--source", *other]))
    with pytest.raises(SystemExit):
        cs.parse_args([*args, "--source", "resid", "a", "b", "c"])  # duplicate name


def test_output_is_written_atomically_as_csv(planted, tmp_path):
    args, *_ = planted
    cs.main(args)
    table = pd.read_csv(tmp_path / "r.csv")
    assert set(table.predictor) == set(cs.PREDICTORS) and set(table.target) == set(cs.TARGETS)
    assert not list(tmp_path.glob("*.tmp*"))


def test_figure10b_is_drawn_from_the_table(planted, tmp_path):
    from saeflow.figures import error_effects

    args, *_ = planted
    cs.main(args)
    for name in ("a.pdf", "b.pdf"):
        error_effects.main(["--figure", "10b", "--table", str(tmp_path / "r.csv"),
                            "--out", str(tmp_path / name)])
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
