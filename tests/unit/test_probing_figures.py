"""The per-regime summary: the L2 curve, the best SAE probe and the quiver with / without SAEs."""

import pandas as pd
import pytest

from saeflow.probing.figures import summary


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
