"""Dark Matter Figures 5-7, 10a and 11-14: the math against float64 references and planted cases,
then every stage end to end on tiny real SAEs, and every plot from its table alone.

Every RNG is seeded by the autouse fixture in conftest.py; the generators below are seeded too.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from saeflow import h5io
from saeflow.dark_matter import (
    error_split,
    norm_baselines,
    norm_prediction,
    per_token,
    probe_similarity,
    scaling,
)
from saeflow.dark_matter.regression import split_mask
from saeflow.figures.dark_matter import DRAW, PlotOptions, plot
from saeflow.sae_eval import evaluate_reconstruction

# Tiny shapes: OpenMP hand-offs cost more than they save (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _ols_r2(x: np.ndarray, y: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """float64 numpy reference: lstsq of y on [x, 1] over fit rows, R² per column on the rest."""
    design = np.column_stack([x, np.ones(len(x))])
    coef = np.linalg.lstsq(design[fit], y[fit], rcond=None)[0]
    resid = y[~fit] - design[~fit] @ coef
    return 1 - (resid**2).sum(0) / ((y[~fit] - y[~fit].mean(0)) ** 2).sum(0)


# ---------------------------------------------------------------- per-token (Figures 6, 10a)


def test_held_out_r2_matches_a_float64_reference():
    g = np.random.default_rng(1)
    x = g.normal(size=(400, 2))
    y = np.column_stack([x @ [1.0, -2.0] + g.normal(size=400), g.normal(size=400)])
    fit = g.random(400) < 0.5
    got = per_token.held_out_r2(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(fit))
    np.testing.assert_allclose(got.numpy(), _ols_r2(x, y, fit), rtol=1e-10, atol=1e-12)


def test_pairwise_r2_on_planted_norms():
    """‖err_1‖ = 2‖err_0‖ + 3 exactly; ‖err_2‖ = ‖err_0‖ + ‖nl_0‖ exactly (nl_0 independent)."""
    g = np.random.default_rng(2)
    e0, nl0 = g.uniform(1, 2, 500), g.uniform(0, 1, 500)
    error = torch.from_numpy(np.column_stack([e0, 2 * e0 + 3, e0 + nl0]))
    nonlinear = torch.from_numpy(np.column_stack([nl0, g.uniform(size=(500, 2))]))
    fit = torch.from_numpy(g.random(500) < 0.5)
    orig, new = per_token.pairwise_r2(error, nonlinear, fit)
    assert orig[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert orig[1, 0] == pytest.approx(1.0, abs=1e-12)
    assert orig[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert 0.3 < orig[0, 2] < 0.95  # e0 alone leaves nl0's variance unexplained
    assert new[0, 2] == pytest.approx(1.0, abs=1e-12)  # adding ‖nl_0‖ explains all of it
    gain = per_token.improvement_percent(orig, new)
    assert gain[0, 2] == pytest.approx(100.0, abs=1e-8)
    assert gain[0, 1] == 0.0  # R²_orig = 1: nothing left to explain, reported as 0


def test_improvement_percent_formula():
    orig = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64)
    new = torch.tensor([0.75, 0.8, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(per_token.improvement_percent(orig, new).numpy(), [50.0, 0.0, 0.0])


# ---------------------------------------------------------------- norm baselines (Figure 13)


def test_token_means_are_out_of_sample():
    """Means come from the fit rows only; an unseen token gets the fit rows' global mean."""
    tokens = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    y = torch.tensor([1.0, 5.0, 2.0, 9.0, 4.0, 7.0, 100.0], dtype=torch.float64)
    fit = torch.tensor([True, False, True, False, True, False, False])
    # fit means: token 0 -> 1, 1 -> 2, 2 -> 4; token 3 unseen -> global fit mean 7/3
    pred = np.array([1.0, 2.0, 4.0, 7 / 3])
    got = norm_baselines.token_means(tokens[fit], y[fit], tokens[~fit])
    np.testing.assert_allclose(got.numpy(), pred, rtol=1e-12)
    held = y[~fit].numpy()
    want = 1 - ((held - pred) ** 2).sum() / ((held - held.mean()) ** 2).sum()
    assert norm_baselines.token_mean_r2(tokens, y, fit) == pytest.approx(want, rel=1e-12)
    # in-sample means (the original) would score better: each scored row pulls its own mean
    in_sample = norm_baselines.token_means(tokens, y, tokens[~fit]).numpy()
    leaky = 1 - ((held - in_sample) ** 2).sum() / ((held - held.mean()) ** 2).sum()
    assert leaky > want + 0.1


def test_loss_rows_follow_the_activation_layout(tmp_path):
    """Row r of the activations is (seq r // kept, position skip + r % kept); last one has no loss."""
    n_seq, ctx, skip = 3, 5, 1
    tokens = np.arange(n_seq * ctx).reshape(n_seq, ctx).astype(np.int32)
    loss_path, acts_path = tmp_path / "loss.h5", tmp_path / "acts.h5"
    with h5py.File(loss_path, "w") as h5:
        h5["loss"] = 1000 * np.arange(n_seq)[:, None] + np.arange(ctx - 1)[None].astype(np.float32)
        h5["tokens"] = tokens
        h5io.mark_complete(h5)
    with h5py.File(acts_path, "w") as h5:
        h5["acts"] = np.zeros((n_seq * (ctx - skip), 2), np.float32)
        h5["tokens"] = tokens[:, skip:].reshape(-1)
        h5io.write_attrs(h5, {"ctx_len": ctx, "skip_positions": skip})
        h5io.mark_complete(h5)
    with h5io.H5File(loss_path) as lm, h5io.H5File(acts_path) as acts:
        rows = norm_baselines.loss_per_row(lm, acts, str(loss_path))
    want = [1, 2, 3, np.nan, 1001, 1002, 1003, np.nan, 2001, 2002, 2003, np.nan]
    np.testing.assert_array_equal(rows, want)


# ---------------------------------------------------------------- probe similarity (Figure 14)


def test_running_mean_matches_a_direct_average():
    values = np.random.default_rng(3).normal(size=37)
    got = probe_similarity.running_mean(values, 5)
    want = [values[max(0, i - 2): i + 3].mean() for i in range(37)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_probe_recovers_each_latents_activation(tmp_path):
    """Orthonormal decoder rows, latent j always fires at c_j: ‖z‖² = Σ c_j² = z·(Σ c_j d_j), so
    the fitted probe's similarity to d_j is exactly c_j, the latent's mean activation."""
    g = torch.Generator().manual_seed(4)
    d, d_sae, n = 8, 5, 600
    w_dec = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:d_sae].contiguous()
    b_dec = torch.randn(d, generator=g)
    c = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    active = torch.rand(n, d_sae, generator=g) < 0.4
    codes = active * c
    sae_x = codes @ w_dec + b_dec
    x = sae_x + 0.1 * torch.randn(n, d, generator=g)
    acts, ev = tmp_path / "acts.h5", tmp_path / "eval.h5"
    with h5py.File(acts, "w") as h5:
        h5["acts"], h5["tokens"] = x.numpy(), np.zeros(n, np.int32)
        h5io.mark_complete(h5)
    with h5py.File(ev, "w") as h5:
        h5["error"], h5["tokens"] = (sae_x - x).numpy(), np.zeros(n, np.int32)
        h5["latent_mean_act"] = c.double().numpy()
        h5["latent_freq"] = active.double().mean(0).numpy()
        h5io.mark_complete(h5)
    probe, bias, r2, mean_act, freq = probe_similarity.fit_probe(str(acts), str(ev), b_dec,
                                                                 0.5, 0, 128)
    # exact up to the float32 storage of x and the error
    assert r2 == pytest.approx(1.0, abs=1e-9) and bias == pytest.approx(0.0, abs=1e-5)
    table = probe_similarity.probe_table(w_dec, probe, mean_act, freq, 2)
    assert list(table.latent) == [0, 1, 2, 3, 4]  # sorted by mean activation, descending
    np.testing.assert_allclose(table.probe_similarity, c.numpy(), atol=1e-5)
    freq[2] = 0  # a dead latent is left out
    assert 2 not in set(probe_similarity.probe_table(w_dec, probe, mean_act, freq, 2).latent)


# ---------------------------------------------------------------- norm prediction (Figure 7)


def test_squared_norms_match_numpy():
    g = np.random.default_rng(6)
    x, err, lin, nl = (g.normal(size=(7, 4)).astype(np.float32) for _ in range(4))
    got = norm_prediction.squared_norms(*(torch.from_numpy(a) for a in (x, err, lin, nl)))
    x, err, lin, nl = (a.astype(np.float64) for a in (x, err, lin, nl))
    parts = [x, x + err, -err, lin, nl, x + err - nl]
    np.testing.assert_allclose(got.numpy(), np.column_stack([(p**2).sum(1) for p in parts]),
                               rtol=1e-12)


def test_streamed_fit_matches_a_float64_reference_whatever_the_chunks():
    g = np.random.default_rng(7)
    x = g.normal(size=(300, 5))
    y = np.column_stack([x @ g.normal(size=5) + 0.5 * g.normal(size=300), g.normal(size=300)])
    test = split_mask(300, 0.5, 0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for chunk in (300, 37):
        def chunks(chunk=chunk):
            for s in range(0, 300, chunk):
                rows = slice(s, min(s + chunk, 300))
                yield rows, xt[rows], yt[rows]
        _, r2, n_fit = norm_prediction.streamed_fit(chunks, ~test, test, 5, 2)
        assert n_fit == int((~test).sum())
        np.testing.assert_allclose(r2.per_dim.numpy(), _ols_r2(x, y, ~test.numpy()), rtol=1e-9)


def test_norm_rows_never_touch_the_error_splits_fit_rows():
    is_test = split_mask(101, 0.5, 3)
    fit, score = norm_prediction.held_out_subsplit(is_test, 0.5, 0)
    assert not (fit & score).any() and torch.equal(fit | score, is_test)
    assert abs(int(fit.sum()) - int(score.sum())) <= 1


# ---------------------------------------------------------------- Figure 5 table


def test_figure5_parts_add_up_to_the_held_out_fvu():
    saes = pd.DataFrame({
        "sae_id": ["a", "b"], "k": [8, 8], "width": [64, 32], "mean_l0": [8.0, 8.0],
        "fvu_test": [0.3, 0.4], "fvu_nonlinear": [0.2, 0.25],
        "fvu_nonlinear_pursuit": [0.15, 0.3], "fvu_pursuit": [0.2, 0.3],
        "fvu_sae_pursuit_rows": [0.3, 0.4], "pursuit_rows": [10, 10]})
    table = scaling.figure5_table(saes)
    assert list(table.width) == [32, 64]
    total = table.linear_error + table.encoder_error + table.nonlinear_error
    np.testing.assert_allclose(total, table.fvu_test)
    np.testing.assert_allclose(table.encoder_error, [-0.05, 0.05])
    assert list(table.note) == ["negative band", ""]


# ---------------------------------------------------------------- stages end to end

D, N_SEQ, CTX, SKIP = 16, 40, 9, 1
N = N_SEQ * (CTX - SKIP)
WIDTHS = (16, 32, 64)


def _sae(width: int, g: torch.Generator) -> TopKSAE:
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=width, k=4))
    w_dec = torch.nn.functional.normalize(torch.randn(width, D, generator=g), dim=1)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=g))
    return sae


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """Three real TopK SAEs on synthetic activations, evaluated and split by the real stages."""
    root = tmp_path_factory.mktemp("family")
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 30, (N_SEQ, CTX), generator=g).int().numpy()
    x = torch.randn(N, D, generator=g) * torch.linspace(0.5, 2.0, D)
    acts = root / "acts.h5"
    with h5py.File(acts, "w") as h5:
        h5["acts"], h5["tokens"] = x.numpy(), tokens[:, SKIP:].reshape(-1)
        h5io.write_attrs(h5, {"ctx_len": CTX, "skip_positions": SKIP})
        h5io.mark_complete(h5)
    loss = root / "lm_loss.h5"
    with h5py.File(loss, "w") as h5:
        h5["loss"] = torch.rand(N_SEQ, CTX - 1, generator=g).numpy() * 5
        h5["tokens"] = tokens
        h5io.mark_complete(h5)
    files: dict = {"acts": acts, "loss": loss, "ids": [], "eval": [], "split": [], "sae": []}
    for width in WIDTHS:
        sae_id, sae = f"w{width}", _sae(width, g)
        sae_dir, ev = root / sae_id, root / f"{sae_id}.h5"
        sae.save_model(str(sae_dir))
        evaluate_reconstruction(sae, str(acts), str(ev), chunk=100, attrs={"sae_id": sae_id})
        split = root / f"{sae_id}.split.h5"
        error_split.main(["--acts", str(acts), "--sae-eval", str(ev), "--out", str(split),
                          "--fit", str(root / f"{sae_id}.fit.h5"), "--metrics",
                          str(root / f"{sae_id}.json"), "--chunk-tokens", "100"])
        for key, value in [("ids", sae_id), ("eval", ev), ("split", split), ("sae", sae_dir)]:
            files[key].append(value)
    return files


@pytest.fixture(scope="module")
def tables(family, tmp_path_factory) -> Path:
    """tables/figure{6,7,10a,11,12,13,14}.csv written by the stage CLIs from the family."""
    out = tmp_path_factory.mktemp("tables")
    per_token.main(["--sae-ids", *family["ids"][::-1], "--sae-eval", *map(str, family["eval"][::-1]),
                    "--split", *map(str, family["split"][::-1]), "--window-start", "10",
                    "--window-length", "30", "--chunk-tokens", "50",
                    *[a for f in ("6", "10a", "11", "12") for a in (f"--fig{f}",
                                                                    str(out / f"figure{f}.csv"))]])
    preds, bases = [], []
    for sae_id, ev, split in zip(family["ids"], family["eval"], family["split"]):
        common = ["--acts", str(family["acts"]), "--sae-eval", str(ev), "--sae-id", sae_id,
                  "--site", "blocks.3.hook_resid_post", "--k", "4", "--chunk-tokens", "70"]
        preds.append(out / f"{sae_id}.pred.json")
        norm_prediction.main(["fit", *common, "--split", str(split), "--out", str(preds[-1])])
        bases.append(out / f"{sae_id}.base.json")
        norm_baselines.main(["fit", *common, "--lm-loss", str(family["loss"]),
                             "--out", str(bases[-1])])
    norm_prediction.main(["table", "--inputs", *map(str, preds), "--out", str(out / "figure7.csv")])
    norm_baselines.main(["table", "--inputs", *map(str, bases), "--out", str(out / "figure13.csv")])
    probe_similarity.main(["--sae", str(family["sae"][-1]), "--acts", str(family["acts"]),
                           "--sae-eval", str(family["eval"][-1]), "--out",
                           str(out / "figure14.csv"), "--metrics", str(out / "probe.json"),
                           "--sae-id", family["ids"][-1], "--smooth", "5"])
    return out


def test_per_token_tables(tables, family):
    fig6 = pd.read_csv(tables / "figure6.csv")
    assert len(fig6) == 9 and sorted(fig6.width_x.unique()) == list(WIDTHS)
    diag = fig6[fig6.width_x == fig6.width_y]
    np.testing.assert_allclose(diag.r2, 1.0, atol=1e-9)  # a norm predicts itself
    # the scored rows are the error split's held-out rows, split again with the same seed
    held_out = int(split_mask(N, 0.5, 0).sum())
    assert fig6.n_fit.iloc[0] + fig6.n_test.iloc[0] == held_out
    fig10a = pd.read_csv(tables / "figure10a.csv")
    np.testing.assert_allclose(fig10a.r2_orig, fig6.r2)
    gain = (fig10a.r2_with_nonlinear - fig10a.r2_orig) / (1 - fig10a.r2_orig) * 100
    off = fig10a.width_x != fig10a.width_y
    np.testing.assert_allclose(fig10a.improvement_percent[off], gain[off], rtol=1e-6)
    window = pd.read_csv(tables / "figure11.csv")
    assert len(window) == 30 * 3 and window.row.min() == 10 and window.row.max() == 39
    with h5io.H5File(family["eval"][0]) as ev:  # ‖err‖ is the L2 norm, not its square
        want = np.sqrt(ev["error_sq_norm"][10:40])
    np.testing.assert_allclose(window[window.width == WIDTHS[0]].error_norm, want, rtol=1e-6)


def test_baselines_match_a_float64_reference(tables, family):
    """Act-norm and L0 baselines: numpy lstsq on the seeded split's rows that have a loss."""
    fig13 = pd.read_csv(tables / "figure13.csv").set_index(["sae_id", "predictor"])
    has_loss = np.tile(np.arange(SKIP, CTX) < CTX - 1, N_SEQ)
    fit = ~split_mask(N, 0.5, 0).numpy()
    for sae_id, ev in zip(family["ids"], family["eval"]):
        with h5io.H5File(ev) as h5:
            y = h5["error_sq_norm"][:].astype(np.float64)[has_loss, None]
            for name in ("act_norm", "l0"):
                x = h5[name][:].astype(np.float64)[has_loss, None]
                want = _ols_r2(x, y, fit[has_loss])[0]
                assert fig13.loc[(sae_id, name), "r2"] == pytest.approx(want, rel=1e-8)


def test_norm_tables(tables):
    fig7 = pd.read_csv(tables / "figure7.csv")
    assert len(fig7) == 3 * len(norm_prediction.TARGETS) and fig7.r2.notna().all()
    assert set(fig7.layer) == {3}
    # only the error split's held-out rows, split again: the nonlinear part is out of sample
    assert (fig7.n_fit + fig7.n_test == int(split_mask(N, 0.5, 0).sum())).all()
    fig13 = pd.read_csv(tables / "figure13.csv")
    assert len(fig13) == 3 * len(norm_baselines.PREDICTORS)
    assert list(fig7.target[:6]) == list(norm_prediction.TARGETS)  # the plot's order
    assert list(fig13.predictor[:5]) == list(norm_baselines.PREDICTORS)
    fig14 = pd.read_csv(tables / "figure14.csv")
    assert fig14.mean_act_when_active.is_monotonic_decreasing and (fig14.freq > 0).all()


def test_window_beyond_the_corpus_is_named(family, tmp_path):
    args = ["--sae-ids", *family["ids"], "--sae-eval", *map(str, family["eval"]), "--split",
            *map(str, family["split"]), "--window-start", str(N + 5),
            *[a for f in ("6", "10a", "11", "12") for a in (f"--fig{f}", str(tmp_path / f))]]
    with pytest.raises(ValueError, match=f"window start {N + 5}.*window_start"):
        per_token.main(args)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("figure", ["6", "7", "10a", "11", "12", "13", "14"])
def test_figures_draw_from_their_table_alone(tables, tmp_path, figure):
    out = tmp_path / f"figure{figure}.pdf"
    plot(figure, str(tables / f"figure{figure}.csv"), str(out),
         PlotOptions(magnify_start=5, magnify_length=8))
    data = out.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_every_figure_has_a_drawer():
    assert set(DRAW) == {"1", "2", "3", "4", "5", "6", "7", "10a", "11", "12", "13", "14"}
    assert json.dumps(sorted(DRAW))  # keys are plain strings, as the rule's wildcard
