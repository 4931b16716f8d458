"""The multi-token attention probe: it finds a signal at a non-last position (where a last-token
probe sees nothing), ignores padding, and is seeded; mean/max pooling over real positions."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from saeflow.probing.attention import fit_attention, pool

pytestmark = pytest.mark.usefixtures("one_thread")


def _task(n: int, seed: int, width: int = 12, d: int = 8):
    """Rows of 5..width real positions; one position before the last carries a marker (dim 0 = 3)
    and the label (dim 1 = +-2). Padding is poisoned: a stronger marker (10), a random label
    10x louder."""
    rng = np.random.RandomState(seed)
    y = rng.randint(0, 2, n)
    sign = np.where(y == 1, 1.0, -1.0)
    lengths = rng.randint(5, width + 1, n)
    x = rng.normal(scale=0.5, size=(n, width, d)).astype(np.float32)
    rows = np.arange(n)
    where = rng.randint(1, lengths - 1)  # never position 0, never the last real one
    x[rows, where, 0] = 3.0
    x[rows, where, 1] = 2.0 * sign
    pad = np.arange(width)[None, :] >= lengths[:, None]
    x[:, :, 0] = np.where(pad, 10.0, x[:, :, 0])
    x[:, :, 1] = np.where(pad, rng.choice([-20.0, 20.0], size=pad.shape), x[:, :, 1])
    return x, lengths, y


def test_attention_probe_finds_a_signal_the_last_token_probe_misses():
    x, lengths, y = _task(400, seed=0)
    xt, lt, yt = _task(200, seed=1)
    res = fit_attention(x, lengths, y, xt, lt, yt, epochs=300, lr=0.03, seed=0)
    assert res.test_auc > 0.95 and res.val_auc > 0.95
    last = LogisticRegression().fit(x[np.arange(400), lengths - 1], y)
    last_auc = roc_auc_score(yt, last.predict_proba(xt[np.arange(200), lt - 1])[:, 1])
    assert last_auc < 0.65 and res.test_auc > last_auc + 0.3
    again = fit_attention(x, lengths, y, xt, lt, yt, epochs=300, lr=0.03, seed=0)
    assert again == res  # seeded: the same split, initialisation and steps


def test_pool_uses_real_positions_after_the_first():
    x = np.arange(2 * 4 * 1, dtype=np.float32).reshape(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    lengths = np.array([3, 1])
    assert pool(x, lengths, "mean").ravel().tolist() == [1.5, 4.0]  # positions 1-2; only 0
    assert pool(x, lengths, "max").ravel().tolist() == [2.0, 4.0]
    assert pool(x, lengths, "mean", skip_first=False).ravel().tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="mean or max"):
        pool(x, lengths, "sum")
