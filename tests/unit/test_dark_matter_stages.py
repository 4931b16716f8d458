"""Dark-matter stages: encoder pursuit on a tiny SAE, scaling tables from synthetic metrics, figures.

Every RNG is seeded by the autouse fixture in conftest.py; the generators below are seeded too.
"""

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sae_lens import TopKSAE, TopKSAEConfig

from saeflow import h5io
from saeflow.config import ConfigError, check
from saeflow.dark_matter import encoder_pursuit, error_split, scaling
from saeflow.dark_matter.regression import split_mask
from saeflow.figures.dark_matter import PlotOptions, plot
from saeflow.sae_eval import evaluate_reconstruction

REPO = Path(__file__).resolve().parents[2]


# Tiny shapes: OpenMP hand-offs cost more than they save (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- encoder pursuit stage

D, K, N = 24, 3, 600


def _easy_sae_and_acts(tmp_path: Path) -> tuple[Path, Path, Path, torch.Tensor]:
    """A TopK SAE whose decoder is an orthonormal dictionary and whose encoder is a noisy copy of
    its transpose, on activations that are sparse non-negative codes over that dictionary.

    On an orthonormal dictionary the best non-negative L-atom code of x - b_dec keeps the L
    largest positive correlations, which is what pursuit finds; the SAE's own code is another
    non-negative code with L atoms, so pursuit's error can never be the larger one on any token.
    """
    g = torch.Generator().manual_seed(5)
    w_dec = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T.contiguous()
    b_dec = 0.5 * torch.randn(D, generator=g)
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=D, k=K))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
        sae.W_enc.copy_(w_dec.T + 0.15 * torch.randn(D, D, generator=g))
        sae.b_enc.zero_()
    idx = torch.stack([torch.randperm(D, generator=g)[:K] for _ in range(N)])
    codes = torch.zeros(N, D).scatter_(1, idx, 1 + torch.rand(N, K, generator=g))
    x = (b_dec + codes @ w_dec + 0.05 * torch.randn(N, D, generator=g)).float()
    acts = tmp_path / "acts.h5"
    with h5py.File(acts, "w") as h5:
        h5["acts"], h5["tokens"] = x.numpy(), np.arange(N, dtype=np.int32) % 50
        h5io.mark_complete(h5)
    sae_dir, sae_eval = tmp_path / "sae", tmp_path / "eval.h5"
    sae.save_model(str(sae_dir))
    evaluate_reconstruction(sae, str(acts), str(sae_eval), chunk=128, attrs={"sae_id": "easy"})
    return sae_dir, acts, sae_eval, x


def _pursuit(tmp_path: Path, sae_dir: Path, acts: Path, sae_eval: Path, *extra: str) -> dict:
    out = tmp_path / "pursuit.json"
    encoder_pursuit.main(["--sae", str(sae_dir), "--acts", str(acts), "--sae-eval", str(sae_eval),
                          "--out", str(out), "--sae-id", "easy", "--chunk-tokens", "64",
                          "--read-chunk-tokens", "100", *extra])
    return json.loads(out.read_text())


def test_pursuit_never_does_worse_than_the_sae_on_an_easy_dictionary(tmp_path):
    sae_dir, acts, sae_eval, _ = _easy_sae_and_acts(tmp_path)
    result = _pursuit(tmp_path, sae_dir, acts, sae_eval)
    assert result["n_rows"] == N and result["mean_target_l0"] == pytest.approx(K, abs=0.1)
    assert result["pursuit_worse_fraction"] == 0.0
    assert 0 < result["fvu_pursuit"] < result["fvu_sae"] <= 1.0
    assert result["fvu_pursuit"] < 0.2 * result["fvu_sae"]  # the noisy encoder is the problem
    assert 0 <= result["fvu_nonlinear_pursuit"] <= 1 and 0 <= result["fvu_nonlinear_sae"] <= 1
    assert result["mean_pursuit_l0"] <= result["mean_target_l0"]


def test_pursuit_scores_the_sae_exactly_as_the_error_split_does(tmp_path):
    """Same split, same rows, same least squares: the SAE's nonlinear FVU must agree."""
    sae_dir, acts, sae_eval, _ = _easy_sae_and_acts(tmp_path)
    result = _pursuit(tmp_path, sae_dir, acts, sae_eval, "--seed", "3", "--test-fraction", "0.4")
    out = {name: tmp_path / f"{name}.{ext}" for name, ext in
           [("split", "h5"), ("fit", "h5"), ("metrics", "json")]}
    error_split.main(["--acts", str(acts), "--sae-eval", str(sae_eval), "--out", str(out["split"]),
                      "--fit", str(out["fit"]), "--metrics", str(out["metrics"]),
                      "--seed", "3", "--test-fraction", "0.4", "--chunk-tokens", "100"])
    split = json.loads(out["metrics"].read_text())
    assert result["fvu_nonlinear_sae"] == pytest.approx(split["fvu_nonlinear"], rel=1e-9)
    assert result["fvu_sae_test"] == pytest.approx(split["fvu_sae"], rel=1e-9)
    assert result["n_test"] == split["n_test"]


def test_pursuit_subset_is_seeded_and_keeps_the_error_split_rows(tmp_path):
    sae_dir, acts, sae_eval, _ = _easy_sae_and_acts(tmp_path)
    rows = encoder_pursuit.pursuit_subset(N, 200, seed=1)
    assert len(rows) == 200 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, encoder_pursuit.pursuit_subset(N, 200, seed=1))
    assert not np.array_equal(rows, encoder_pursuit.pursuit_subset(N, 200, seed=2))
    np.testing.assert_array_equal(encoder_pursuit.pursuit_subset(N, 10**6, 0), np.arange(N))
    result = _pursuit(tmp_path, sae_dir, acts, sae_eval, "--tokens", "200", "--seed", "1")
    assert result["n_rows"] == 200 and result["n_rows_eval"] == N
    assert result["n_test"] == int(split_mask(N, 0.5, 1)[torch.from_numpy(rows)].sum())


def test_pursuit_refuses_an_sae_with_normalised_inputs(tmp_path):
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=D, k=K, normalize_activations="layer_norm"))
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        encoder_pursuit.decoder(sae)


# ---------------------------------------------------------------- scaling tables

WIDTHS, KS = [1000, 2000, 4000, 8000], [16, 32]
TRUTH = {16: (3.0, 0.5, 0.10), 32: (2.0, 0.5, 0.06)}  # k -> (a, m, c)


def _nonlinear(width: int, k: int) -> float:
    return 0.05 - 0.01 * (k == 32) + 0.002 * np.log2(width / 1000)


def _pursuit_nonlinear(width: int, k: int) -> float:
    return _nonlinear(width, k) - 0.004 - 0.001 * np.log2(width / 1000)


def _write_family(tmp_path: Path, widths=WIDTHS, ks=KS) -> dict[str, list[str]]:
    """Metrics files of a synthetic family whose FVU follows c + a·W^(-m) exactly."""
    files: dict[str, list[str]] = {"ids": [], "cfg": [], "eval": [], "split": [], "pursuit": []}
    for k in ks:
        a, m, c = TRUTH[k]
        for w in widths:
            sae_id, fvu, nl = f"fam-w{w}-k{k}", c + a * w ** (-m), _nonlinear(w, k)
            records = {
                "cfg": {"d_sae": w, "k": k, "d_in": 64},
                "eval": {"sae_id": sae_id, "fvu": fvu, "mean_l0": k, "n_tokens": 1000},
                "split": {"sae_id": sae_id, "fvu_nonlinear": nl, "fvu_sae": fvu, "r2_mean": 0.3,
                          "r2_pooled": 1 - nl / fvu, "norm_r2": 0.5, "n_test": 500, "seed": 0,
                          "linear_norm_fraction": 1 - nl / fvu, "test_fraction": 0.5,
                          "nonlinear_norm_fraction": nl / fvu},
                "pursuit": {"sae_id": sae_id, "fvu_pursuit": 0.9 * fvu, "fvu_sae": fvu,
                            "fvu_nonlinear_sae": nl, "seed": 0, "test_fraction": 0.5,
                            "fvu_nonlinear_pursuit": _pursuit_nonlinear(w, k), "n_rows": 1000,
                            "pursuit_worse_fraction": 0.0},
            }
            files["ids"].append(sae_id)
            for name, record in records.items():
                path = tmp_path / f"{sae_id}.{name}.json"
                path.write_text(json.dumps(record))
                files[name].append(str(path))
    return files


def _collect(tmp_path: Path, files: dict[str, list[str]]) -> tuple[Path, Path]:
    saes, fits = tmp_path / "saes.csv", tmp_path / "fits.csv"
    scaling.main(["collect", "--sae-ids", *files["ids"], "--sae-cfg", *files["cfg"],
                  "--eval-metrics", *files["eval"], "--split-metrics", *files["split"],
                  "--pursuit", *files["pursuit"], "--saes-out", str(saes), "--fits-out",
                  str(fits), "--n-boot", "20"])
    return saes, fits


def _figure_table(tmp_path: Path, saes: Path, fits: Path, n: int, *extra: str) -> pd.DataFrame:
    out = tmp_path / f"figure{n}.csv"
    scaling.main(["figure", "--figure", str(n), "--saes", str(saes), "--fits", str(fits),
                  "--out", str(out), *extra])
    return pd.read_csv(out)


def test_power_law_fits_recover_the_synthetic_family(tmp_path):
    saes, fits = _collect(tmp_path, _write_family(tmp_path))
    table = pd.read_csv(fits).set_index(["k", "quantity"])
    for k, (a, m, c) in TRUTH.items():
        row = table.loc[(k, "fvu")]
        assert row.a == pytest.approx(a, rel=1e-3) and row.m == pytest.approx(m, abs=1e-3)
        assert row.c == pytest.approx(c, abs=1e-5) and row.rmse < 1e-6
        assert row.c_lo <= row.c <= row.c_hi
    rows = pd.read_csv(saes)
    assert len(rows) == len(WIDTHS) * len(KS)
    np.testing.assert_allclose(rows.linear_predictable_fraction,
                               1 - rows.fvu_nonlinear / rows.fvu_test)


def test_figure1_bands_match_their_definitions_and_add_up_to_the_fvu(tmp_path):
    saes, fits = _collect(tmp_path, _write_family(tmp_path))
    fig1 = _figure_table(tmp_path, saes, fits, 1, "--headline-l0", "20", "--extrapolate", "4")
    a, m, c = TRUTH[16]
    assert set(fig1.k) == {16}  # 16 is the k closest to 20
    measured = fig1.loc[fig1.measured].sort_values("width")
    assert measured.width.tolist() == WIDTHS
    widths = measured.width.to_numpy()
    mean_nl = np.mean([_nonlinear(w, 16) for w in WIDTHS])
    pursuit_nl = np.array([_pursuit_nonlinear(w, 16) for w in WIDTHS])
    expected = {"absent_features": a * widths ** (-m), "linear_error": c - mean_nl,
                "encoder_error": mean_nl - pursuit_nl, "nonlinear_error": pursuit_nl}
    for band, want in expected.items():
        np.testing.assert_allclose(measured[band], want, atol=1e-5, err_msg=band)
    bands = fig1[list(expected)].sum(axis=1)
    np.testing.assert_allclose(bands, fig1.total_fvu, atol=1e-12)  # every width, curve included
    np.testing.assert_allclose(measured[list(expected)].sum(axis=1), measured.fvu, atol=1e-5)
    assert fig1.width.max() == pytest.approx(4 * max(WIDTHS))
    assert fig1.extrapolated.sum() > 0 and (fig1.note.isna() | (fig1.note == "")).all()


def test_other_figure_tables_have_one_row_per_sae_or_point(tmp_path):
    saes, fits = _collect(tmp_path, _write_family(tmp_path))
    n_saes = len(WIDTHS) * len(KS)
    fig2 = _figure_table(tmp_path, saes, fits, 2)
    assert (fig2.kind == "measured").sum() == 2 * n_saes
    assert set(fig2[fig2.kind == "fit"].quantity) == {"fvu"}
    for n in (3, 4):
        table = _figure_table(tmp_path, saes, fits, n)
        assert len(table) == n_saes and set(table.k) == set(KS)


def test_pursuit_on_a_subset_is_anchored_to_the_full_split(tmp_path):
    files = _write_family(tmp_path, widths=[1000, 2000, 4000], ks=[16])
    record = json.loads(Path(files["pursuit"][0]).read_text())
    record |= {"fvu_nonlinear_sae": 0.08, "fvu_nonlinear_pursuit": 0.07, "n_rows": 300}
    Path(files["pursuit"][0]).write_text(json.dumps(record))
    saes, _ = _collect(tmp_path, files)
    row = pd.read_csv(saes).iloc[0]
    assert row.fvu_nonlinear_pursuit_rows == pytest.approx(0.07)
    assert row.fvu_nonlinear_pursuit == pytest.approx(row.fvu_nonlinear - 0.01)


def test_too_few_widths_are_reported_not_fitted(tmp_path):
    saes, fits = _collect(tmp_path, _write_family(tmp_path, widths=[1000, 2000], ks=[16]))
    table = pd.read_csv(fits)
    assert table.a.isna().all() and table.note.str.contains("need >= 3").all()
    with pytest.raises(scaling.ScalingInputError, match="no power-law fit of fvu at k = 16"):
        _figure_table(tmp_path, saes, fits, 1)


def test_mismatched_inputs_are_named(tmp_path):
    files = _write_family(tmp_path, widths=[1000, 2000, 4000], ks=[16])
    record = json.loads(Path(files["pursuit"][1]).read_text())
    Path(files["pursuit"][1]).write_text(json.dumps(record | {"seed": 7}))
    with pytest.raises(scaling.ScalingInputError, match=r"fam-w2000-k16\.pursuit\.json: seed 7"):
        _collect(tmp_path, files)
    files["ids"][0] = "other"
    with pytest.raises(scaling.ScalingInputError, match="made for SAE 'fam-w1000-k16'"):
        _collect(tmp_path, files)


# ---------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def figure_tables(tmp_path_factory) -> Path:
    """tables/figure1-4.csv of the synthetic family, in a folder without the tables behind them."""
    work, tables = tmp_path_factory.mktemp("collect"), tmp_path_factory.mktemp("tables")
    saes, fits = _collect(work, _write_family(work))
    for n in scaling.FIGURES:
        _figure_table(tables, saes, fits, n)
    return tables


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_figures_write_a_pdf_from_their_table_alone(figure_tables, tmp_path, n):
    out = tmp_path / f"figure{n}.pdf"
    plot(n, str(figure_tables / f"figure{n}.csv"), str(out),
         PlotOptions(width=5, height=3, log_y=n == 2))
    data = out.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left over
    if n == 1:  # no creation date: the same table gives the same bytes
        plot(n, str(figure_tables / "figure1.csv"), str(tmp_path / "again.pdf"),
             PlotOptions(width=5, height=3))
        again = tmp_path / "again.pdf"
        plot(n, str(figure_tables / "figure1.csv"), str(out), PlotOptions(width=5, height=3))
        assert out.read_bytes() == again.read_bytes()


def test_figure_table_missing_a_column_is_named(tmp_path):
    table = tmp_path / "figure4.csv"
    pd.DataFrame({"width": [1], "k": [2]}).to_csv(table, index=False)
    with pytest.raises(h5io.InputFileError, match=r"figure4\.csv: columns \['fvu_nonlinear'\]"):
        plot(4, str(table), str(tmp_path / "out.pdf"), PlotOptions())
    assert not (tmp_path / "out.pdf").exists()


# ---------------------------------------------------------------- config


def _default_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c["dark_matter"].update(family="nope"),
         r"dark_matter\.family: 'nope' is not declared under 'sae_families'"),
        (lambda c: c["sae_families"]["resid6_topk"].update(widths=[1152, 2304]),
         r"dark_matter\.family: family 'resid6_topk' has 2 width\(s\)"),
        (lambda c: c["dark_matter"].update(family="resid6_relu"),
         r"family 'resid6_relu' is standard; .* must be topk or batchtopk"),
    ],
)
def test_dark_matter_family_is_checked_before_anything_runs(mutate, needle):
    config = copy.deepcopy(_default_config())
    check(config)  # the default itself is fine
    mutate(config)
    with pytest.raises(ConfigError, match=needle):
        check(config)
