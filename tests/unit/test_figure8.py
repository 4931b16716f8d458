"""Figure 8 table and plot: pooled counts over latents against hand-computed numbers."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from saeflow import h5io
from saeflow.figures import figure8


def scorer(pos: list[int], tot: list[int], neg_pos: int, neg_tot: int) -> dict:
    return {"decile_positives": pos, "decile_totals": tot, "nonactivating_positives": neg_pos,
            "nonactivating_totals": neg_tot, "prompts": 1, "unparseable": 0, "failed": 0}


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def record(latent: int, det: dict, fuzz: dict | None = None, explained: bool = True) -> dict:
    return {"latent": latent, "explanation": "words about cats" if explained else None,
            "detection": det, "fuzzing": fuzz or det}


@pytest.fixture
def results(tmp_path: Path) -> dict:
    lin = [record(3, scorer([0] * 9 + [2], [2] * 10, 1, 4)),
           record(8, scorer([1] * 10, [2] * 9 + [1], 0, 5))]
    nonlin = [record(1, scorer([2] * 10, [2] * 10, 3, 3)),
              record(2, scorer([0] * 10, [0] * 10, 0, 0), explained=False)]
    return {"linear": write(tmp_path / "lin.jsonl", lin),
            "nonlinear": write(tmp_path / "nonlin.jsonl", nonlin)}


def test_table_pools_counts_over_latents(results, tmp_path):
    out = tmp_path / "figure8.csv"
    figure8.main(["table", "--results", results["linear"], results["nonlinear"],
                  "--labels", "linear", "nonlinear", "--out", str(out)])
    table = pd.read_csv(out).set_index(["dictionary", "scorer", "x"])
    assert len(table) == 2 * 2 * 11
    # linear, Not: 9 non-activating examples, 1 false positive -> 1 - FPR = 8/9
    row = table.loc[("linear", "detection", "Not")]
    assert (row.k, row.n) == (8, 9)
    assert row.value == pytest.approx(8 / 9)
    assert row.wald_half == pytest.approx(1.96 * math.sqrt(8 / 9 * 1 / 9 / 9), rel=1e-4)
    # linear, Q10: 2 + 1 hits of 2 + 1 examples; Q1: 0 + 1 of 2 + 2
    q10, q1 = table.loc[("linear", "detection", "Q10")], table.loc[("linear", "detection", "Q1")]
    assert (q10.k, q10.n, q10.value, q10.wald_half) == (3, 3, 1.0, 0.0)
    assert (q1.k, q1.n) == (1, 4) and q1.value == pytest.approx(0.25)
    assert q1.wilson_lo < 0.25 < q1.wilson_hi
    # nonlinear: every example called active -> Not = 0/3, recall 1; unexplained latent counted 0
    assert table.loc[("nonlinear", "detection", "Not")].value == 0.0
    assert (table.loc[("nonlinear", "detection", "Q5")].k,
            table.loc[("nonlinear", "detection", "Q5")].n) == (2, 2)
    assert table.loc[("nonlinear", "detection", "Q5")].latents == 1
    assert table.loc[("linear", "detection", "Q5")].latents == 2


def test_plot_is_drawn_from_the_table_and_deterministic(results, tmp_path):
    table = tmp_path / "figure8.csv"
    figure8.main(["table", "--results", results["linear"], results["nonlinear"],
                  "--labels", "linear", "nonlinear", "--out", str(table)])
    pdfs = []
    for name in ("a.pdf", "b.pdf"):
        figure8.main(["plot", "--table", str(table), "--out", str(tmp_path / name)])
        pdfs.append((tmp_path / name).read_bytes())
    assert pdfs[0].startswith(b"%PDF") and pdfs[0] == pdfs[1]


def test_bad_records_name_the_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [{"latent": 1, "detection": {}, "fuzzing": {}}])
    with pytest.raises(h5io.InputFileError, match=r"bad.jsonl:1: record lacks detection"):
        figure8.read_records(bad)
    with pytest.raises(SystemExit):
        figure8.main(["table", "--results", bad, "--labels", "a", "b", "--out", "x.csv"])


def test_balanced_accuracy_is_half_for_a_judge_that_always_says_yes():
    rows = pd.DataFrame({"x": ["Not", "Q1", "Q2"], "k": [0, 5, 5], "n": [10, 5, 5]})
    assert figure8.balanced_accuracy(rows) == 0.5  # recall 1, 1 - FPR 0
    rows = pd.DataFrame({"x": ["Not", "Q1", "Q2"], "k": [9, 2, 4], "n": [10, 5, 5]})
    assert figure8.balanced_accuracy(rows) == pytest.approx((6 / 10 + 9 / 10) / 2)
    assert math.isnan(figure8.balanced_accuracy(pd.DataFrame(rows[rows.x != "Not"])))
