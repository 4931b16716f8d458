"""saeflow.training_comparison on a small synthetic workdir: the three trainers' logs mapped onto
one schema, the wall-time columns, the evaluation rows, and the figure with its CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from saeflow.training_comparison import comparison_table, main, normalise_log


def _sae(root: Path, sae_id: str, d_sae: int, arch: str, log: pd.DataFrame, metrics: dict,
         bench_s: float | None) -> tuple[str, str]:  # fmt: skip
    folder = root / "saes" / sae_id
    folder.mkdir(parents=True)
    cfg = {"architecture": arch, "d_sae": d_sae, "metadata": {"training_architecture": arch}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (root / "logs").mkdir(exist_ok=True)
    log.to_csv(root / "logs" / f"{sae_id}.train_log.csv", index=False)
    metrics_path = root / f"{sae_id}.metrics.json"
    metrics_path.write_text(json.dumps(metrics))
    if bench_s is not None:
        (root / "bench").mkdir(exist_ok=True)
        (root / "bench" / f"{sae_id}.tsv").write_text(f"s\th:m:s\n{bench_s}\t0:00:{bench_s:g}\n")
    return str(folder), str(metrics_path)


@pytest.fixture
def workdir(tmp_path: Path) -> dict:
    topk_log = pd.DataFrame({
        "step": [1, 2, 3], "tokens": [100, 200, 300], "loss": [1.0, 0.5, 0.4],
        "fvu": [0.9, 0.5, 0.3], "auxk_loss": 0.0, "l0": 4.0, "dead_fraction": [0.0, 0.1, 0.2],
        "lr": 1e-3, "tokens_per_s": [50.0, 100.0, 25.0],
    })  # fmt: skip
    sae_lens_log = pd.DataFrame({
        "step": [10, 20], "tokens": [1000, 2000], "lr": 1e-3, "loss": 1.0, "l1_loss": 0.1,
        "mse_loss": 0.9, "l0": [50.0, 30.0], "explained_variance": [0.25, 0.75],
        "dead_features": [0, 8],
    })  # fmt: skip
    saex_log = pd.DataFrame({
        "step": [5], "tokens": [500], "loss": 1.0, "fvu": [0.4], "sparsity": 1.0, "ghost": 0.0,
        "gated_aux": 0.0, "l0": [7.0], "dead_fraction": [0.5], "lr": 1e-3,
    })  # fmt: skip
    metrics = {"fvu": 0.25, "ce_loss_score": 0.9, "mean_l0": 4.5, "dead_fraction": 0.05}
    entries = [
        ("fam_a", *_sae(tmp_path, "a-w8-k4", 8, "topk", topk_log, metrics, 20.0)),
        ("fam_b", *_sae(tmp_path, "b-w16-l1_1", 16, "standard", sae_lens_log, metrics, 40.0)),
        ("fam_c", *_sae(tmp_path, "c-w8-s1", 8, "saex", saex_log, metrics, None)),
    ]
    return {"root": tmp_path, "entries": entries}


def _table(workdir: dict) -> pd.DataFrame:
    fams, dirs, mets = zip(*workdir["entries"])
    root = workdir["root"]
    return comparison_table(dirs, fams, mets, str(root / "logs"), str(root / "bench"))


def test_logs_of_every_trainer_map_onto_one_schema(workdir: dict) -> None:
    t = _table(workdir)
    a = t[(t.sae_id == "a-w8-k4") & (t.source == "train_log")]
    assert list(a.fvu) == [0.9, 0.5, 0.3] and list(a.dead_fraction) == [0.0, 0.1, 0.2]
    # cumulative training time from the logged rates: 100/50, + 100/100, + 100/25
    assert list(a.wall_s) == pytest.approx([2.0, 3.0, 7.0]) and set(a.wall_from) == {"log"}
    b = t[(t.sae_id == "b-w16-l1_1") & (t.source == "train_log")]
    assert list(b.fvu) == pytest.approx([0.75, 0.25])  # 1 - SAELens explained variance
    assert list(b.dead_fraction) == pytest.approx([0.0, 0.5])  # 8 dead of d_sae 16
    assert list(b.wall_s) == pytest.approx([20.0, 40.0])  # the benchmark's 40 s by token share
    c = t[t.sae_id == "c-w8-s1"]
    assert c.wall_s.isna().all()  # no benchmark, no rate: unknown, not invented
    ev = t[t.source == "eval"]
    assert list(ev.sae_id) == ["a-w8-k4", "b-w16-l1_1", "c-w8-s1"]
    assert list(ev.tokens) == [300, 2000, 500] and list(ev.wall_s[:2]) == [20.0, 40.0]
    assert (ev.ce_loss_score == 0.9).all() and (ev.l0 == 4.5).all()
    assert t[t.source == "train_log"].ce_loss_score.isna().all()
    assert list(t.family.unique()) == ["fam_a", "fam_b", "fam_c"]


def test_a_log_without_fvu_is_rejected() -> None:
    with pytest.raises(Exception, match="explained_variance"):
        normalise_log(pd.DataFrame({"tokens": [1], "l0": [1.0]}), 4, None)
    assert math.isnan(
        normalise_log(
            pd.DataFrame({"tokens": [1], "l0": [1.0], "fvu": [0.1]}), 4, None
        ).dead_fraction[0]
    )


def test_cli_writes_table_and_figure_with_its_csv(workdir: dict) -> None:
    fams, dirs, mets = zip(*workdir["entries"])
    root = workdir["root"]
    out = root / "tables" / "training_comparison.csv"
    main(["table", "--sae", *dirs, "--family", *fams, "--metrics", *mets,
          "--log-dir", str(root / "logs"), "--bench-dir", str(root / "bench"), "--out", str(out)])  # fmt: skip
    pdf = root / "plots" / "training_comparison.pdf"
    main(["plot", "--table", str(out), "--out", str(pdf), "--width", "6", "--height", "4"])
    assert pdf.read_bytes().startswith(b"%PDF")
    pd.testing.assert_frame_equal(pd.read_csv(pdf.with_suffix(".csv")), pd.read_csv(out))
    with pytest.raises(ValueError, match="same number of SAEs"):
        comparison_table(dirs[:1], fams, mets[:1], "x", "y")
