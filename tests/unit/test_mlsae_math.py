"""saeflow.mlsae.math: MLSAE loss and gradients, standardisation, layer statistics, MMCS,
each against an autograd, float64 or brute-force reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow.mlsae.math import (
    adjacent_cosine,
    dense_codes,
    destandardise,
    layer_dists,
    layer_fvu,
    loss_and_grads,
    mmcs,
    standardise,
    summarise_dists,
    variance_terms,
)
from saeflow.mlsae.similarity import max_cosine, pair_histogram
from saeflow.topk import TopKCodes, TopKParams

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(d: int, m: int, dtype: torch.dtype = torch.float64) -> TopKParams:
    gen = torch.Generator().manual_seed(3)
    W_dec = F.normalize(torch.randn(m, d, generator=gen, dtype=dtype), dim=1)
    W_enc = (W_dec.t() + 0.1 * torch.randn(d, m, generator=gen, dtype=dtype)).contiguous()
    return TopKParams(W_enc, torch.zeros(m, dtype=dtype), W_dec,
                      0.1 * torch.randn(d, generator=gen, dtype=dtype))


def _autograd_loss(p: TopKParams, x: Tensor, k: int, dead: Tensor | None, k_aux: int) -> Tensor:
    """The documented loss, plainly: mean over layers of FVU plus the AuxK term."""
    L, B, d = x.shape
    flat = x.reshape(-1, d)
    pre = (flat - p.b_dec) @ p.W_enc + p.b_enc
    vals, idx = pre.topk(k, dim=1)
    recon = torch.zeros_like(pre).scatter(1, idx, vals.relu()) @ p.W_dec + p.b_dec
    err = (recon - flat).view(L, B, d)
    var = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    loss = (err.pow(2).sum((1, 2)) / var).mean()
    if dead is not None:
        n_dead = int(dead.sum())
        av, ai = torch.where(dead, pre, -torch.inf).topk(min(k_aux, n_dead), dim=1)
        e_aux = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ p.W_dec
        e = (flat - recon).detach()
        loss = loss + (1 / 32) * min(n_dead / k_aux, 1.0) * (
            (e_aux - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum())
    return loss


@pytest.mark.parametrize("n_dead", [0, 7])
def test_gradients_equal_autograd_float64(n_dead: int) -> None:
    L, B, d, m, k = 3, 20, 8, 24, 3
    p = _params(d, m)
    x = torch.randn(L, B, d, dtype=torch.float64) * torch.arange(1, L + 1).view(L, 1, 1)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[:n_dead] = True
    out = loss_and_grads(p, x, k, dead_mask=dead if n_dead else None, k_aux=4)
    leaves = [t.clone().requires_grad_() for t in p]
    ref = _autograd_loss(TopKParams(*leaves), x, k, dead if n_dead else None, 4)
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach())
    for name, mine, leaf in zip(TopKParams._fields, out.grads, leaves):
        expected = torch.zeros_like(leaf) if name == "b_enc" else leaf.grad
        torch.testing.assert_close(mine, expected, msg=name)
    if n_dead:
        assert out.auxk_loss > 0


def test_layer_fvu_is_per_layer() -> None:
    x = torch.randn(4, 50, 6, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn_like(x)
    fvu = layer_fvu(x, x_hat)
    for layer in range(4):
        xl, rl = x[layer], x_hat[layer]
        assert float(fvu[layer]) == pytest.approx(
            float((rl - xl).pow(2).sum() / (xl - xl.mean(0)).pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_standardisation_round_trip(dtype: torch.dtype, tol: float) -> None:
    x = (torch.randn(5, 7, 64) * 30 + torch.randn(5, 7, 1) * 100).to(dtype)
    s = standardise(x)
    torch.testing.assert_close(s.x.mean(-1), torch.zeros(5, 7, dtype=dtype), atol=tol, rtol=0)
    torch.testing.assert_close(destandardise(s.x, s), x, atol=tol * float(x.abs().max()), rtol=tol)


def _random_codes(L: int, T: int, k: int, m: int) -> TopKCodes:
    idx = torch.stack([torch.randperm(m)[:k] for _ in range(L * T)]).view(L, T, k)
    val = torch.rand(L, T, k).masked_fill(torch.rand(L, T, k) < 0.2, 0.0)
    return TopKCodes(val, idx)


def test_layer_dists_against_brute_force() -> None:
    L, T, k, m = 4, 30, 3, 10
    codes = _random_codes(L, T, k, m)
    counts, totals = layer_dists(codes, L, m)
    ref_c = torch.zeros(L, m, dtype=torch.float64)
    ref_t = torch.zeros(L, m, dtype=torch.float64)
    for layer in range(L):
        for t in range(T):
            for slot in range(k):
                j, v = int(codes.indices[layer, t, slot]), float(codes.values[layer, t, slot])
                ref_c[layer, j] += v > 0
                ref_t[layer, j] += v
    assert torch.equal(counts, ref_c)
    torch.testing.assert_close(totals, ref_t)
    dists = summarise_dists(totals)
    for j in range(m):
        p = [float(ref_t[layer, j] / ref_t[:, j].sum()) for layer in range(L)]
        mean = sum(layer * pl for layer, pl in enumerate(p))
        var = sum((layer - mean) ** 2 * pl for layer, pl in enumerate(p))
        assert float(dists.layer_mean[j]) == pytest.approx(mean, abs=1e-12)
        assert float(dists.layer_std[j]) == pytest.approx(var ** 0.5, abs=1e-7)


def test_variance_terms_against_brute_force() -> None:
    L, T, k, m = 5, 12, 2, 6
    latents = dense_codes(_random_codes(L, T, k, m), m).double()

    def var_of(p: list[float]) -> float:
        mean = sum(i * pi for i, pi in enumerate(p))
        return sum(i * i * pi for i, pi in enumerate(p)) - mean * mean

    probs = [[[0.0] * m for _ in range(T)] for _ in range(L)]
    for t in range(T):
        for j in range(m):
            total = sum(float(latents[layer, t, j]) for layer in range(L))
            for layer in range(L):
                probs[layer][t][j] = float(latents[layer, t, j]) / total if total else 0.0
    e_tf = sum(var_of([probs[layer][t][j] for layer in range(L)])
               for t in range(T) for j in range(m)) / (T * m)
    agg = [[sum(probs[layer][t][j] for t in range(T)) / T for j in range(m)] for layer in range(L)]
    e_f = sum(var_of([agg[layer][j] for layer in range(L)]) for j in range(m)) / m
    var_l = var_of([sum(agg[layer]) / m for layer in range(L)])
    got = variance_terms(latents)
    assert got.exp_var_l_tf == pytest.approx(e_tf, rel=1e-10)
    assert got.exp_var_l_f == pytest.approx(e_f, rel=1e-10)
    assert got.var_l == pytest.approx(var_l, rel=1e-10)
    assert got.rel_var_t == pytest.approx(e_tf / e_f, rel=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_mmcs_against_float64_reference(chunk: int) -> None:
    a, b = torch.randn(50, 16), torch.randn(70, 16)
    a64, b64 = a.double(), b.double()
    cos = (a64 @ b64.T) / a64.norm(dim=1, keepdim=True) / b64.norm(dim=1)
    value, per_row = mmcs(a, b, chunk)
    assert value == pytest.approx(float(cos.max(dim=1).values.mean()), abs=1e-6)
    torch.testing.assert_close(per_row.double(), cos.max(dim=1).values, atol=1e-6, rtol=0)
    assert mmcs(a, a, chunk)[0] == pytest.approx(1.0, abs=1e-6)
    # without the diagonal: the float64 max over the other rows, and the row attaining it
    self_cos = (a64 @ a64.T) / a64.norm(dim=1, keepdim=True) / a64.norm(dim=1)
    self_cos.fill_diagonal_(-2.0)
    best = max_cosine(a, a, chunk, exclude_self=True)
    torch.testing.assert_close(best.values.double(), self_cos.max(dim=1).values, atol=1e-6,
                               rtol=0)
    assert torch.equal(best.indices, self_cos.argmax(dim=1))
    assert torch.equal(max_cosine(a, b, chunk).indices, cos.argmax(dim=1))


def test_adjacent_cosine_against_loops() -> None:
    x = torch.randn(3, 40, 8, dtype=torch.float64)
    got = adjacent_cosine(x)
    for layer in range(2):
        a = x[layer] - x[layer].mean(0)
        b = x[layer + 1] - x[layer + 1].mean(0)
        ref = sum(float(a[t] @ b[t] / a[t].norm() / b[t].norm()) for t in range(40)) / 40
        assert float(got[layer]) == pytest.approx(ref, abs=1e-12)


def test_pair_histogram_against_numpy() -> None:
    import numpy as np

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(37, 64, generator=gen)
    mean = torch.rand(37, generator=gen) * 6
    got = pair_histogram(w, mean, bins=(8, 16), x_range=(0.0, 5.0), y_range=(-0.25, 0.25),
                         chunk=5)
    w64 = w.double() / w.double().norm(dim=1, keepdim=True)
    i, j = np.triu_indices(37, k=1)
    xs = np.abs(mean.double().numpy()[i] - mean.double().numpy()[j])
    ys = (w64 @ w64.T).numpy()[i, j]
    ref, _, _ = np.histogram2d(xs, ys, bins=[8, 16], range=[(0, 5), (-0.25, 0.25)])
    assert np.array_equal(got.numpy(), ref)
    assert 0 < got.sum() < len(xs)  # some pairs fall outside the ranges
