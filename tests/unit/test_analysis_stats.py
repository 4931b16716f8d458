"""The streaming analyzer against brute force on a small random TopK code."""

import itertools

import numpy as np
import pytest
import torch

from saeflow.analysis import stats


def _code(n=600, m=12, k=3, seed=0):
    """Dense [n, m] TopK-like code: k active latents per token with positive values; latent 11
    never fires (dead) and latent 0 fires on most tokens."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((n, m), np.float32)
    for t in range(n):
        ids = rng.choice(m - 1, size=k, replace=False)
        dense[t, ids] = rng.gamma(2.0, 1.0, size=k).astype(np.float32)
    dense[rng.random(n) < 0.8, 0] = 1.5
    return dense


def _csr(dense):
    rows, cols = np.nonzero(dense)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(dense)))])
    return ptr, cols.astype(np.int32), dense[rows, cols]


def _run(dense, chunk, s):
    ptr, idx, val = _csr(dense)
    return stats.latent_stats(lambda: stats.iter_csr(ptr, idx, val, chunk), dense.shape[1], s)


S = stats.Settings(n_top=4, n_bins=3, n_per_bin=2, n_nonact=5, n_hist=6, seed=3)


def test_counts_max_hist_top_match_brute_force():
    dense = _code().astype(np.float64)
    res = _run(dense.astype(np.float32), 64, S)
    assert res.n_tokens == len(dense)
    np.testing.assert_array_equal(res.count, (dense > 0).sum(0))
    np.testing.assert_allclose(res.max, dense.max(0), rtol=1e-6)
    np.testing.assert_allclose(res.mean_act, np.where((dense > 0).sum(0) > 0, dense.sum(0) / np.maximum((dense > 0).sum(0), 1), 0), rtol=1e-5)
    for latent in range(dense.shape[1]):
        col = dense[:, latent]
        act = col[col > 0]
        if len(act) == 0:
            assert res.hist[latent].sum() == 0 and (res.top_row[latent] == -1).all()
            continue
        # equal-width bins over (0, max], right-closed (the max falls in the last bin)
        edges = np.linspace(0, col.max(), S.n_hist + 1)
        ref = np.array([((act > lo) & (act <= hi)).sum() for lo, hi in itertools.pairwise(edges)])
        np.testing.assert_array_equal(res.hist[latent], ref)
        order = np.lexsort((np.arange(len(col)), -col))[: S.n_top]
        order = order[col[order] > 0]
        np.testing.assert_array_equal(res.top_row[latent, : len(order)], order)
        np.testing.assert_allclose(res.top_val[latent, : len(order)], col[order], rtol=1e-6)


def test_interval_bins_hold_only_their_values_and_counts():
    dense = _code()
    res = _run(dense, 50, S)
    for latent in range(10):
        col = dense[:, latent]
        edges = np.linspace(0, col.max(), S.n_bins + 1)
        for b in range(S.n_bins):
            inside = np.nonzero((col > edges[b]) & (col <= edges[b + 1] * (1 + 1e-7)))[0]
            assert res.bin_count[latent, b] == len(inside)
            rows = res.bin_row[latent, b]
            rows = rows[rows >= 0]
            assert len(rows) == min(S.n_per_bin, len(inside)) and len(set(rows)) == len(rows)
            assert set(rows) <= set(inside)
            np.testing.assert_allclose(res.bin_val[latent, b, : len(rows)], col[rows])


def test_samples_do_not_depend_on_chunking_and_change_with_seed():
    dense = _code()
    a, b = _run(dense, 37, S), _run(dense, 600, S)
    for name in ("top_row", "bin_row", "nonact_row", "hist"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = _run(dense, 37, stats.Settings(**{**S.__dict__, "seed": 4}))
    assert not np.array_equal(a.bin_row, c.bin_row)


def test_bin_samples_are_uniform():
    """Bottom-k sampling: every activation of a bin is picked about equally often over seeds."""
    dense = np.zeros((40, 2), np.float32)
    dense[:, 0] = 1.0  # one bin (all equal to the max) with 40 members
    ptr, idx, val = _csr(dense)
    hits = np.zeros(40)
    for seed in range(400):
        s = stats.Settings(n_top=1, n_bins=1, n_per_bin=4, n_nonact=1, n_hist=2, seed=seed)
        res = stats.latent_stats(lambda: stats.iter_csr(ptr, idx, val, 7), 2, s)
        hits[res.bin_row[0, 0]] += 1
    expected = 400 * 4 / 40
    assert hits.min() > expected * 0.4 and hits.max() < expected * 1.8


def test_nonactivating_samples_are_inactive_and_distinct():
    dense = _code()
    res = _run(dense, 64, S)
    for latent in range(dense.shape[1]):
        rows = res.nonact_row[latent]
        rows = rows[rows >= 0]
        assert len(set(rows)) == len(rows)
        assert (dense[rows, latent] == 0).all()
        if (dense[:, latent] == 0).mean() > 0.5:
            assert len(rows) == S.n_nonact
    assert (res.nonact_row[11] >= 0).all()  # the dead latent is inactive everywhere


def test_window_acts_match_dense():
    dense = _code(n=90)
    ptr, idx, val = _csr(dense)
    centre = np.array([0, 29, 30, 44, 89])
    latent = np.array([1, 2, 3, 4, 5])
    rows = stats.window_rows(centre, seq_len=30, before=3, after=2)
    assert rows[1].tolist() == [26, 27, 28, 29, -1, -1]  # 29 ends sequence 0
    assert rows[2].tolist() == [-1, -1, -1, 30, 31, 32]
    got = stats.gather_acts(stats.iter_csr(ptr, idx, val, 16), rows, latent, dense.shape[1])
    ref = np.where(rows >= 0, dense[np.maximum(rows, 0), latent[:, None]], 0)
    np.testing.assert_array_equal(got, ref)


def test_logits_and_neighbours_match_float64():
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(20, 8, generator=g)
    w_u = torch.randn(8, 50, generator=g)
    res = stats.top_logits(w_dec, w_u, k=3, chunk=7)
    ref = w_dec.double() @ w_u.double()
    assert torch.equal(res.pos_ids, ref.topk(3).indices)
    assert torch.equal(res.neg_ids, ref.topk(3, largest=False).indices)
    torch.testing.assert_close(res.pos_val.double(), ref.topk(3).values, rtol=1e-5, atol=1e-5)
    w_dec[5] = 2.0 * w_dec[13]  # same direction
    near = stats.nearest_latents(w_dec, k=2, chunk=6)
    assert near.ids[5, 0] == 13 and near.ids[13, 0] == 5
    assert near.cos[5, 0] == pytest.approx(1.0, abs=1e-5)
    assert (near.ids != torch.arange(20)[:, None]).all()


def test_round_sig_matches_python_formatting():
    """The documents' vectorised rounding gives float(f"{v:.5g}"), zeros and non-finite kept."""
    from saeflow.analysis.analyze import round_sig

    rng = np.random.default_rng(0)
    values = rng.standard_normal(10_000) * 10.0 ** rng.integers(-6, 6, 10_000)
    expected = np.array([float(f"{v:.5g}") for v in values])
    got = round_sig(values)
    # exact but for decimal ties, where the two roundings may differ in the last digit
    assert (got == expected).mean() > 0.999
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    special = round_sig(np.array([0.0, -0.0, np.inf, -np.inf, 123456.0, -0.000123456]))
    assert special[:4].tolist() == [0.0, 0.0, np.inf, -np.inf]
    assert special[4:].tolist() == [123460.0, -0.00012346]
