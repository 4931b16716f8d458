"""The per-regime summary: the L2 curve, the best SAE probe and the quiver with / without SAEs."""

import pandas as pd
import pytest

from saeflow.probing.figures import summary
from saeflow.probing.sweeps import by_layer, k_curve


def test_quiver_picks_by_validation_auc_with_ties_to_the_sae():
    base = pd.DataFrame({
        "dataset": ["a", "a", "b", "b"], "method": ["logreg", "knn", "logreg", "knn"],
        "test_auc": [0.70, 0.90, 0.80, 0.60], "val_auc": [0.7, 0.8, 0.9, 0.5]})
    sae = pd.DataFrame({
        "dataset": ["a", "a", "b"], "k": [1, 16, 1], "sae_id": ["s", "s", "s"],
        "test_auc": [0.50, 0.95, 0.99], "val_auc": [0.6, 0.8, 0.85]})
    row = summary(base, sae, "normal").iloc[0]
    assert row["baseline_test_auc"] == pytest.approx((0.70 + 0.80) / 2)  # logreg only
    assert row["sae_test_auc"] == pytest.approx((0.95 + 0.99) / 2)  # k by validation AUC
    # without SAEs: a -> knn (0.8 > 0.7), b -> logreg; with SAEs: a ties 0.8 -> SAE, b -> logreg
    assert row["quiver_nosae_test_auc"] == pytest.approx((0.90 + 0.80) / 2)
    assert row["quiver_test_auc"] == pytest.approx((0.95 + 0.80) / 2)
    assert row["n_datasets"] == 2


def _sweep_frames():
    base = pd.DataFrame({
        "dataset": ["a", "a", "b", "b", "a", "b"], "method": ["logreg", "knn"] * 2 + ["logreg"] * 2,
        "layer": [6, 6, 6, 6, 9, 9],
        "test_auc": [0.70, 0.90, 0.80, 0.60, 0.75, 0.65], "val_auc": [0.7, 0.8, 0.9, 0.5, 0.6, 0.6]})
    sae = pd.DataFrame({
        "dataset": ["a", "a", "b", "b"], "k": [1, 16, 1, 16], "sae_id": ["s"] * 4, "layer": [6] * 4,
        "binarize": [False] * 4,
        "test_auc": [0.50, 0.95, 0.99, 0.70], "val_auc": [0.6, 0.8, 0.85, 0.9]})
    return base, sae


def test_k_curve_means_over_datasets_beside_the_l2_baseline_at_the_same_layer():
    curve = k_curve(*_sweep_frames())
    assert curve["k"].tolist() == [1, 16]
    assert curve["test_auc"].tolist() == pytest.approx([(0.50 + 0.99) / 2, (0.95 + 0.70) / 2])
    # the layer-6 L2 baseline (0.70, 0.80), not layer 9's
    assert curve["baseline_test_auc"].tolist() == pytest.approx([0.75, 0.75])
    assert curve["n_datasets"].tolist() == [2, 2]


def test_by_layer_shares_the_wins_by_validation_auc():
    table = by_layer(*_sweep_frames()).set_index(["layer", "method"])
    # layer 6: a -> knn and the SAE (k=16) tie at 0.8; b -> logreg and the SAE (k=16) tie at 0.9
    assert table.loc[(6, "sae"), "test_auc"] == pytest.approx((0.95 + 0.70) / 2)
    assert table.loc[(6, "sae"), "best_share"] == pytest.approx(0.5)
    assert table.loc[(6, "knn"), "best_share"] == pytest.approx(0.25)
    assert table.loc[(6, "logreg"), "best_share"] == pytest.approx(0.25)
    assert table.loc[(9, "logreg"), "best_share"] == 1.0
    assert table.loc[(9, "logreg"), "test_auc"] == pytest.approx(0.70)
    assert pd.Series(table.groupby("layer")["best_share"].sum()).tolist() == pytest.approx([1.0, 1.0])
