"""Dark Matter scaling on a pretrained-like family (Gemma Scope: JumpReLU SAEs, no k, several
nominal L0s per width that differ from width to width): the SAEs are grouped per target L0 by
the nominal L0 closest to it at each width, the power laws are fitted over those picks, and the
Figure 1-5 and Figure 9 tables are built from them."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saeflow.dark_matter import downstream_ce as dce
from saeflow.dark_matter import scaling
from saeflow.dark_matter.power_law import power_law
from saeflow.figures.dark_matter import PlotOptions, plot

# width -> nominal L0s, shaped like the paper overlay's grid (L0s differ per width)
GRID = {1000: [11, 36, 58, 68, 138], 2000: [11, 57, 344], 4000: [11, 55, 298],
        8000: [19, 62, 114], 16000: [11, 50, 259]}
PICKS_60 = {1000: 58, 2000: 57, 4000: 55, 8000: 62, 16000: 50}  # closest to 60
PICKS_12 = {1000: 11, 2000: 11, 4000: 11, 8000: 19, 16000: 11}  # closest to 12


def _truth(l0: float) -> tuple[float, float, float]:
    """(a, m, c) of FVU(W) = c + a·W^(-m); c depends on the L0 only, so the picks of one target
    follow a power law only up to the L0 differences between them."""
    return 3.0, 0.5, 0.02 + 0.5 / l0


def _fvu(width: int, l0: float) -> float:
    a, m, c = _truth(l0)
    return c + a * width ** (-m)


def _nonlinear(width: int, l0: float) -> float:
    return 0.01 + 0.1 / l0 + 0.001 * np.log2(width / 1000)


def _write_family(tmp_path: Path, grid=GRID, with_nominal=True) -> dict[str, list]:
    """cfg.json (no k, as SAELens writes a JumpReLU SAE's) and metrics files of every SAE."""
    files: dict[str, list] = {"ids": [], "cfg": [], "eval": [], "split": [], "pursuit": [],
                              "l0": []}
    for width, l0s in grid.items():
        for l0 in l0s:
            sae_id, fvu, nl = f"gs-w{width}-l0-{l0}", _fvu(width, l0), _nonlinear(width, l0)
            records = {
                "cfg": {"d_sae": width, "d_in": 64, "architecture": "jumprelu"},
                "eval": {"sae_id": sae_id, "fvu": fvu, "mean_l0": l0 * 1.1, "n_tokens": 1000},
                "split": {"sae_id": sae_id, "fvu_nonlinear": nl, "fvu_sae": fvu, "r2_mean": 0.3,
                          "r2_pooled": 1 - nl / fvu, "norm_r2": 0.5, "n_test": 500, "seed": 0,
                          "linear_norm_fraction": 1 - nl / fvu, "test_fraction": 0.5,
                          "nonlinear_norm_fraction": nl / fvu},
                "pursuit": {"sae_id": sae_id, "fvu_pursuit": 0.9 * fvu, "fvu_sae": fvu,
                            "fvu_nonlinear_sae": nl, "seed": 0, "test_fraction": 0.5,
                            "fvu_nonlinear_pursuit": 0.8 * nl, "n_rows": 1000,
                            "pursuit_worse_fraction": 0.0},
            }
            files["ids"].append(sae_id)
            files["l0"].append(str(l0))
            for name, record in records.items():
                path = tmp_path / f"{sae_id}.{name}.json"
                path.write_text(json.dumps(record))
                files[name].append(str(path))
    return files


def _collect(tmp_path: Path, files: dict[str, list], targets=("60",)) -> tuple[Path, Path]:
    saes, fits = tmp_path / "saes.csv", tmp_path / "fits.csv"
    scaling.main(["collect", "--sae-ids", *files["ids"], "--sae-cfg", *files["cfg"],
                  "--eval-metrics", *files["eval"], "--split-metrics", *files["split"],
                  "--pursuit", *files["pursuit"], "--saes-out", str(saes), "--fits-out",
                  str(fits), "--nominal-l0", *files["l0"], "--l0-targets", *targets,
                  "--n-boot", "20"])
    return saes, fits


def _figure(tmp_path: Path, saes: Path, fits: Path, n: int, *extra: str) -> pd.DataFrame:
    out = tmp_path / f"figure{n}.csv"
    scaling.main(["figure", "--figure", str(n), "--saes", str(saes), "--fits", str(fits),
                  "--out", str(out), *extra])
    return pd.read_csv(out)


def test_per_sae_table_keys_each_sae_by_its_nominal_l0(tmp_path):
    saes, _ = _collect(tmp_path, _write_family(tmp_path))
    table = pd.read_csv(saes)
    assert len(table) == sum(len(v) for v in GRID.values())
    assert table.k.isna().all()  # JumpReLU: no k, and none invented
    row = table.set_index("sae_id").loc["gs-w2000-l0-344"]
    assert row.l0 == 344 and row.width == 2000 and row.mean_l0 == pytest.approx(344 * 1.1)


def test_groups_pick_the_closest_nominal_l0_at_each_width():
    saes = pd.DataFrame([{"sae_id": f"w{w}-l{l0}", "width": w, "l0": l0, "k": np.nan}
                         for w, l0s in GRID.items() for l0 in l0s])
    groups = scaling.sparsity_groups(saes, [60, 12, 60])  # duplicates collapse
    assert [(key, grouping) for key, grouping, _ in groups] == [(12, "closest_l0"),
                                                                 (60, "closest_l0")]
    for (key, _, group), picks in zip(groups, [PICKS_12, PICKS_60]):
        assert dict(zip(group.width, group.l0)) == picks
        assert list(group.width) == sorted(GRID) and (group.k == key).all()
    # a tie goes to the smaller L0, as in the rule's headline pick
    tie = pd.DataFrame({"sae_id": ["a", "b"], "width": [1, 1], "l0": [50, 70], "k": np.nan})
    assert list(scaling.closest_l0(tie, 60).sae_id) == ["a"]


def test_power_law_is_fitted_over_the_picks_of_each_target(tmp_path):
    _, fits = _collect(tmp_path, _write_family(tmp_path), targets=("60", "12"))
    table = pd.read_csv(fits)
    assert sorted(set(table.k)) == [12, 60] and set(table.grouping) == {"closest_l0"}
    row = table[(table.k == 60) & (table.quantity == "fvu")].iloc[0]
    widths = np.array(sorted(PICKS_60), dtype=float)
    measured = np.array([_fvu(w, PICKS_60[w]) for w in widths])
    # the fit is made over those five SAEs (one per width): its curve passes close to them
    np.testing.assert_allclose(power_law(widths, row.a, row.m, row.c), measured, atol=2e-3)
    assert row.n_widths == len(GRID)
    assert row.c == pytest.approx(np.mean([_truth(v)[2] for v in PICKS_60.values()]), abs=5e-3)
    low = table[(table.k == 12) & (table.quantity == "fvu")].iloc[0]
    assert low.c > row.c + 0.01  # lower L0, more unexplained variance


def test_figure_tables_follow_the_l0_groups(tmp_path):
    saes, fits = _collect(tmp_path, _write_family(tmp_path), targets=("60", "12"))
    fig1 = _figure(tmp_path, saes, fits, 1, "--headline-l0", "60", "--extrapolate", "2")
    measured = fig1.loc[fig1.measured].sort_values("width")
    assert set(fig1.k) == {60} and set(fig1.grouping) == {"closest_l0"}
    assert dict(zip(measured.width, measured.l0)) == PICKS_60
    assert list(measured.sae_id) == [f"gs-w{w}-l0-{v}" for w, v in PICKS_60.items()]
    bands = ["absent_features", "linear_error", "encoder_error", "nonlinear_error"]
    np.testing.assert_allclose(fig1[bands].sum(axis=1), fig1.total_fvu, atol=1e-12)
    mean_nl = np.mean([_nonlinear(w, v) for w, v in PICKS_60.items()])
    np.testing.assert_allclose(fig1.fvu_nonlinear_mean, mean_nl)

    fig2 = _figure(tmp_path, saes, fits, 2)
    fvu = fig2[(fig2.kind == "measured") & (fig2.quantity == "fvu")]
    assert len(fvu) == 2 * len(GRID)  # one SAE per width in each of the two groups
    k12 = fvu.loc[fvu.k == 12]
    assert dict(zip(k12.width, k12.l0)) == PICKS_12
    assert set(fig2[fig2.kind == "fit"].k) == {12, 60}

    fig5 = _figure(tmp_path, saes, fits, 5)
    assert len(fig5) == 2 * len(GRID)
    np.testing.assert_allclose(fig5.linear_error + fig5.encoder_error + fig5.nonlinear_error,
                               fig5.fvu_test)
    for n in (3, 4):  # the whole width x nominal-L0 grid, keyed by each SAE's own L0
        grid = _figure(tmp_path, saes, fits, n)
        assert len(grid) == sum(len(v) for v in GRID.values())
        assert sorted(zip(grid.width, grid.k)) == sorted(
            (w, v) for w, l0s in GRID.items() for v in l0s)


def test_missing_nominal_l0_or_a_contradicting_one_is_named(tmp_path):
    files = _write_family(tmp_path)
    with pytest.raises(scaling.ScalingInputError, match=r"gs-w1000-l0-11\.cfg\.json: no 'k'"):
        scaling.collect(files["ids"], files["cfg"], files["eval"], files["split"],
                        files["pursuit"])
    topk = tmp_path / "topk.cfg.json"
    topk.write_text(json.dumps({"d_sae": 1000, "k": 16}))
    args = (files["ids"][0], str(topk), files["eval"][0], files["split"][0], files["pursuit"][0])
    with pytest.raises(scaling.ScalingInputError, match=r"topk\.cfg\.json: k 16 differs"):
        scaling.sae_row(*args, 58.0)
    for nominal in (16.0, float("nan"), None):  # what the rule passes for a TopK SAE, or none
        row = scaling.sae_row(*args, nominal)
        assert row["k"] == row["l0"] == 16
    with pytest.raises(scaling.ScalingInputError, match="no shared k.*--l0-targets"):
        saes = scaling.collect(files["ids"], files["cfg"], files["eval"], files["split"],
                               files["pursuit"], [float(v) for v in files["l0"]])
        scaling.fit_table(saes, n_boot=5, seed=0)


def test_topk_tables_ignore_l0_targets(tmp_path):
    """A TopK family is grouped by k whatever the targets; its l0 is its k."""
    saes = pd.DataFrame([{"sae_id": f"w{w}-k{k}", "width": w, "k": k, "l0": k}
                         for w in (1000, 2000) for k in (16, 32)])
    groups = scaling.sparsity_groups(saes, [60])
    assert [(key, grouping, len(g)) for key, grouping, g in groups] == [(16, "k", 2),
                                                                         (32, "k", 2)]


def test_figure9_uses_the_nominal_l0_for_saes_without_k(tmp_path):
    ids, results, evals, nominal = [], [], [], []
    for width, l0s in GRID.items():
        for l0 in l0s:
            sae_id = f"gs-w{width}-l0-{l0}"
            result = {"sae_id": sae_id, "width": width, "k": None, "ce_sae": 3.0,
                      "ce_clean": 2.0, "ce_sae_linear": 2.9, "ce_sae_nonlinear": 2.5,
                      "pct_recovered_sae_linear": 10.0, "pct_recovered_sae_nonlinear": 50.0}
            # measured mean L0s that would pick differently from the nominal ones
            ev = {"sae_id": sae_id, "mean_l0": 60.0 if l0 == min(l0s) else 500.0}
            for store, record, name in [(results, result, "ce"), (evals, ev, "eval")]:
                path = tmp_path / f"{sae_id}.{name}.json"
                path.write_text(json.dumps(record))
                store.append(str(path))
            ids.append(sae_id)
            nominal.append(str(l0))
    out = tmp_path / "figure9.csv"
    dce.main(["table", "--sae-ids", *ids, "--results", *results, "--eval-metrics", *evals,
              "--out", str(out), "--nominal-l0", *nominal, "--headline-l0", "60",
              "--k-width", "1000"])
    table = pd.read_csv(out)
    width_panel = table[(table.panel == "width") & (table.setting == "sae_linear")]
    assert dict(zip(width_panel.width, width_panel.l0)) == PICKS_60
    k_panel = table[(table.panel == "k") & (table.setting == "sae_linear")]
    assert sorted(k_panel.l0) == GRID[1000] and set(k_panel.width) == {1000}
    with pytest.raises(ValueError, match="same length"):
        dce.collect(ids, results, evals, [58.0])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_plots_draw_the_l0_group_tables(tmp_path, n):
    """The figure stage draws these tables as it draws a TopK family's (a sparse L0 grid in
    Figures 3 and 4: n/a where a width lacks an L0)."""
    saes, fits = _collect(tmp_path, _write_family(tmp_path), targets=("60", "12"))
    _figure(tmp_path, saes, fits, n)
    out = tmp_path / f"figure{n}.pdf"
    plot(n, str(tmp_path / f"figure{n}.csv"), str(out), PlotOptions(width=5, height=3))
    assert out.read_bytes().startswith(b"%PDF")
