"""Metrics against float64 numpy references written from the definitions."""

import numpy as np
import pytest
import torch

from saeflow import metrics
from saeflow.metrics import (
    ReconstructionStats,
    fvu,
    l0,
    log_probs,
    mse,
    next_token_ce,
    next_token_nll,
    recovered_score,
    spliced_ce_kl,
)


def _data(n=500, d=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d) * 4
    x_hat = x + rng.normal(scale=0.7, size=(n, d))
    return x, x_hat


def test_fvu_and_mse_match_float64_reference():
    x, x_hat = _data()
    ref_fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    ref_mse = ((x - x_hat) ** 2).mean()
    xt, rt = torch.tensor(x, dtype=torch.float32), torch.tensor(x_hat, dtype=torch.float32)
    assert abs(fvu(xt, rt) - ref_fvu) / ref_fvu < 1e-6
    assert abs(mse(xt, rt) - ref_mse) / ref_mse < 1e-6
    assert fvu(xt, xt) == 0.0


def test_streamed_stats_equal_all_at_once_for_uneven_chunks():
    x, x_hat = _data(n=997)
    latents = np.where(np.random.default_rng(1).random((997, 50)) < 0.1, 1.0, 0.0)
    stats = ReconstructionStats(d=x.shape[1])
    for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 997)]:
        stats.update(torch.tensor(x[lo:hi]), torch.tensor(x_hat[lo:hi]),
                     l0(torch.tensor(latents[lo:hi])))
    result = stats.result()
    ref_fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    assert abs(result["fvu"] - ref_fvu) / ref_fvu < 1e-10
    assert abs(result["mse"] - ((x - x_hat) ** 2).mean()) < 1e-12
    assert result["mean_l0"] == (latents != 0).sum(axis=1).mean()
    assert result["n_tokens"] == 997


def test_l0_counts_nonzero_latents():
    latents = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1e-9, 4.0, 5.0]])
    assert l0(latents).tolist() == [2, 0, 4]


@pytest.mark.parametrize("slice_elements", [1 << 21, 16, 3])
def test_next_token_ce_and_kl_match_reference(monkeypatch, slice_elements):
    # 16 logits per slice cuts each row of 4 predictions over a vocabulary of 7 into blocks
    # of 2 positions; 3 (< v) falls back to one position per block
    monkeypatch.setattr(metrics, "SLICE_ELEMENTS", slice_elements)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 7))
    tokens = rng.integers(0, 7, size=(2, 5))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref_ce = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    ce = next_token_ce(torch.tensor(logits, dtype=torch.float32), torch.tensor(tokens))
    assert ce.dtype == torch.float64 and ce.shape == (2, 4)
    np.testing.assert_allclose(ce.numpy(), ref_ce, rtol=1e-6)  # float32 logits in
    clean_logp = log_probs(torch.tensor(logits))
    np.testing.assert_allclose(clean_logp.numpy(), logp[:, :-1], rtol=1e-12)
    np.testing.assert_allclose(next_token_nll(clean_logp, torch.tensor(tokens)).numpy(), ref_ce,
                               rtol=1e-12)
    other = logits + rng.normal(size=logits.shape)
    logq = other - np.log(np.exp(other).sum(-1, keepdims=True))
    ref_kl = (np.exp(logp) * (logp - logq)).sum(-1)[:, :-1]
    ref_ce_other = -np.take_along_axis(logq[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    ce_other, kl = spliced_ce_kl(clean_logp, torch.tensor(other), torch.tensor(tokens))
    np.testing.assert_allclose(kl.numpy(), ref_kl, rtol=1e-10)
    np.testing.assert_allclose(ce_other.numpy(), ref_ce_other, rtol=1e-12)
    _, kl_self = spliced_ce_kl(clean_logp, torch.tensor(logits), torch.tensor(tokens))
    assert kl_self.abs().max() < 1e-12


def test_recovered_score_endpoints():
    assert recovered_score(clean=2.0, patched=2.0, ablated=6.0) == 1.0
    assert recovered_score(clean=2.0, patched=6.0, ablated=6.0) == 0.0
    assert recovered_score(clean=2.0, patched=3.0, ablated=6.0) == 0.75
