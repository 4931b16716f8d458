"""Regime splits: sizes, ratios, exact flip fractions, disjoint train/test, seeding."""

import numpy as np
import pytest

from saeflow.probing import regimes


@pytest.fixture
def y():
    return (np.arange(600) % 3 == 0).astype(np.int64)  # unbalanced: 1/3 positive


def test_normal_is_balanced_train_and_natural_test(y):
    (sp,) = regimes.splits(y, "normal")
    assert len(sp.train) == min(600 - 100, 1024, 2 * 200) and sp.y_train.mean() == 0.5
    assert len(np.intersect1d(sp.train, sp.test)) == 0 and len(sp.train) + len(sp.test) == 600


def test_scarcity_sizes_inside_the_normal_train_set(y):
    out = regimes.splits(y, "scarcity", (2, 10, 100, 5000))
    assert [len(s.train) for s in out] == [2, 10, 100]  # 5000 exceeds the data: skipped
    normal = regimes.splits(y, "normal")[0]
    assert all(np.isin(s.train, normal.train).all() for s in out)


def test_imbalance_fractions_in_train_and_test(y):
    for sp in regimes.splits(y, "imbalance", (0.1, 0.5, 0.9)):
        assert abs(sp.y_train.mean() - sp.value) < 0.02 and abs(y[sp.test].mean() - sp.value) < 0.02
        assert len(np.intersect1d(sp.train, sp.test)) == 0


def test_label_noise_flips_exactly(y):
    for sp in regimes.splits(y, "label_noise", (0.0, 0.25, 0.5)):
        flipped = (sp.y_train != y[sp.train]).sum()
        assert flipped == int(len(sp.train) * sp.value)
    with pytest.raises(ValueError, match="0.6"):
        regimes.flip_labels(y, 0.6)


def test_seeded_and_seed_dependent(y):
    a, b = regimes.splits(y, "scarcity", (20,), seed=1), regimes.splits(y, "scarcity", (20,), seed=1)
    c = regimes.splits(y, "scarcity", (20,), seed=2)
    assert (a[0].train == b[0].train).all() and not (a[0].train == c[0].train).all()
