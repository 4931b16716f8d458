"""The OOD regime (train on the dataset, score on its OOD set) and binarised SAE latents."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from saeflow.probing import acts, figures, regimes, run, sae_acts

pytestmark = pytest.mark.usefixtures("one_thread")


def _task(n: int, flip: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dimension 0 carries the label (+-1.5, sign reversed when ``flip``); 7 noise dimensions."""
    rng = np.random.RandomState(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 1.5, -1.5) * (-1 if flip else 1)
    return x, y


def test_ood_split_is_balanced_seeded_and_tests_the_whole_ood_set():
    y = (np.arange(900) % 3 == 0).astype(np.int64)  # 300 positives
    sp = regimes.ood_split(y, n_ood=77, seed=3)
    assert len(sp.train) == 600 and sp.y_train.mean() == 0.5  # min(900, 1024, 2 * 300)
    assert np.array_equal(sp.test, np.arange(77)) and len(np.unique(sp.train)) == 600
    assert np.array_equal(sp.train, regimes.ood_split(y, 77, seed=3).train)
    assert not np.array_equal(sp.train, regimes.ood_split(y, 77, seed=4).train)
    assert len(regimes.ood_split(np.tile([0, 1], 1500), 10).train) == 1024
    with pytest.raises(ValueError, match="1 rows"):
        regimes.ood_split(y, 1)
    with pytest.raises(ValueError, match="ood_split"):
        regimes.splits(y, "ood")


def test_ood_probes_are_scored_on_the_ood_set_not_in_distribution():
    # The OOD set reverses the label's sign: an in-distribution test (the original's B9.5 defect)
    # would score about 1, the OOD set about 0.
    x, y = _task(400, flip=False, seed=0)
    x_ood, y_ood = _task(120, flip=True, seed=1)
    (normal,) = run.baseline_rows("d", x, y, 6, "normal", (), "torch", 42)
    (ood,) = run.baseline_rows("d", x, y, 6, "ood", (), "torch", 42, ood=(x_ood, y_ood))
    assert normal["test_auc"] > 0.95 and ood["test_auc"] < 0.05
    assert ood["val_auc"] > 0.95  # selection stays in distribution
    z, z_ood = sparse.csr_matrix(np.maximum(x, 0)), sparse.csr_matrix(np.maximum(x_ood, 0))
    rows = run.sae_rows("d", z, y, "s", 6, "ood", (), [1, 4], "normalized_mean_diff", False,
                        "torch", 42, ood=(z_ood, y_ood))
    assert [r["k"] for r in rows] == [1, 4] and all(r["test_auc"] < 0.2 for r in rows)
    with pytest.raises(ValueError, match="--ood-acts"):
        run.baseline_rows("d", x, y, 6, "ood", (), "torch", 42)
    with pytest.raises(ValueError, match="only 'ood'"):
        run.baseline_rows("d", x, y, 6, "normal", (), "torch", 42, ood=(x_ood, y_ood))


def test_ood_cli_and_figure_write_the_originals_schema(tmp_path: Path):
    site = "blocks.6.hook_resid_post"
    files = {}
    (tmp_path / "z").mkdir()
    for name, flip, seed in (("a", False, 0), ("a_OOD", True, 1), ("b", False, 2),
                             ("b_OOD", False, 3)):
        x, y = _task(300 if "OOD" not in name else 90, flip, seed)
        files[name] = str(tmp_path / f"{name}.h5")
        acts.write(files[name], {site: x}, y, np.full(len(y), 5), {"dataset": name})
        z = sparse.csr_matrix(np.maximum(x, 0))
        sae_acts.write(str(tmp_path / "z" / f"{name}.h5"), z, y, {"sae_id": "s"})
    base, sae = str(tmp_path / "base.csv"), str(tmp_path / "sae.csv")
    run.main(["baseline", "--acts", files["a"], "--acts", files["b"], "--ood-acts",
              files["a_OOD"], "--ood-acts", files["b_OOD"], "--site", site, "--layer", "6",
              "--regime", "ood", "--threads", "1", "--out", base])
    run.main(["sae", "--sae-acts", str(tmp_path / "z" / "a.h5"), "--sae-acts",
              str(tmp_path / "z" / "b.h5"), "--ood-acts", str(tmp_path / "z" / "a_OOD.h5"),
              "--ood-acts", str(tmp_path / "z" / "b_OOD.h5"), "--sae-id", "s", "--layer", "6",
              "--regime", "ood", "--ks", "1", "4", "--threads", "1", "--out", sae])
    with pytest.raises(SystemExit, match="one OOD set per file"):
        run.main(["baseline", "--acts", files["a"], "--site", site, "--layer", "6",
                  "--regime", "ood", "--out", str(tmp_path / "x.csv")])
    table, pdf = tmp_path / "ood.csv", tmp_path / "ood.pdf"
    figures.main(["--regime", "ood", "--baseline", base, "--sae", sae, "--out-baselines",
                  str(tmp_path / "tb.csv"), "--out-sae", str(tmp_path / "ts.csv"),
                  "--table", str(table), "--pdf", str(pdf)])
    out = pd.read_csv(table).set_index("dataset")
    assert list(out.columns[:2]) == ["test_auc_baseline", "test_auc_sae"]
    assert out.loc["a", "test_auc_baseline"] < 0.05 and out.loc["b", "test_auc_baseline"] > 0.95
    assert out.loc["b", "test_auc_sae"] > 0.9 and out.loc["a", "sae_id"] == "s"
    assert pdf.read_bytes().startswith(b"%PDF")


def _binarize_task(n: int, seed: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Latent 0: positives 0.6, negatives 0 (separates perfectly, but never above 1).
    Latent 1: on for 90% of positives at 1.5, for 40% of negatives at 20 (the on-rate carries
    the label above the threshold; the magnitude points the other way). Latents 2-3: noise < 1."""
    rng = np.random.RandomState(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    z = np.zeros((n, 4), dtype=np.float32)
    z[:, 0] = np.where(y == 1, 0.6, 0.0)
    on = rng.rand(n) < np.where(y == 1, 0.9, 0.4)
    z[:, 1] = np.where(on, np.where(y == 1, 1.5, 20.0), 0.0)
    z[:, 2:] = rng.uniform(0, 0.9, size=(n, 2))
    return sparse.csr_matrix(z), y


def test_binarize_latents_is_strictly_above_the_threshold():
    x = np.array([[0.0, 0.5, 1.0, 1.0001, 7.0, -3.0]])
    assert binarized(x, 1.0) == [0, 0, 0, 1, 1, 0]
    assert binarized(x, 0.0) == [0, 1, 1, 1, 1, 0]
    assert run.binarize_latents(x).dtype == np.float32


def binarized(x, threshold):
    return run.binarize_latents(x, threshold).ravel().tolist()


def test_binarised_probes_see_only_whether_latents_exceed_the_threshold():
    z, y = _binarize_task(800, seed=0)
    rows = run.sae_rows("d", z, y, "s", 6, "normal", (), [4], "normalized_mean_diff", True,
                        "torch", 42)
    raw = [r for r in rows if not r["binarize"]]
    (binar,) = [r for r in rows if r["binarize"]]
    assert len(raw) == 1 and raw[0]["test_auc"] > 0.99  # latent 0 separates the raw latents
    # x > 1 drops latent 0 and keeps latent 1's on-rate: AUC 0.5 + (0.9 - 0.4) / 2 = 0.75; a
    # threshold of 0 would keep latent 0 (AUC 1) and raw test latents would score about 0.57.
    assert 0.65 < binar["test_auc"] < 0.85
    (nonzero,) = [r for r in run.sae_rows("d", z, y, "s", 6, "normal", (), [4],
                                          "normalized_mean_diff", True, "torch", 42,
                                          threshold=0.0) if r["binarize"]]
    assert nonzero["test_auc"] > 0.99
    # without the flag: raw latents only
    assert not any(r["binarize"] for r in run.sae_rows(
        "d", z, y, "s", 6, "normal", (), [4], "normalized_mean_diff", False, "torch", 42))
