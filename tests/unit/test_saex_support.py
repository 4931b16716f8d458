"""The saex loss on the codes' support against the dense autograd path, in float64."""

from __future__ import annotations

import pytest
import torch

from saeflow import techniques as T
from saeflow.saex_train import SaexTrainConfig, init_state, loss_terms, train_step

D, M, B = 7, 48, 60


def _leaves(gated: bool, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f64 = {"generator": gen, "dtype": torch.float64}
    leaves = [
        torch.randn(D, M, **f64), torch.randn(M, **f64) - 1.5, torch.rand(M, **f64) + 0.5,
        torch.randn(M, D, **f64) * (torch.rand(M, 1, **f64) + 0.5), torch.randn(D, **f64) * 0.1,
    ]  # fmt: skip
    leaves[1][:4] = -100.0  # four latents that never fire
    if gated:
        leaves += [torch.randn(M, **f64), torch.randn(M, **f64) - 1.5]
        leaves[6][:4] = -100.0
    return [t.requires_grad_() for t in leaves]


def _terms_and_grads(leaves, x, cfg, max_density):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    terms = loss_terms(leaves, x, cfg, 3, torch.zeros(M, dtype=torch.bool), max_density)
    grads = torch.autograd.grad(terms["loss"], leaves, allow_unused=True)
    return terms, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


@pytest.mark.parametrize("kind", T.SPARSITY_LOSSES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_support_loss_and_gradients_match_the_dense_path(kind, gated, weighted):
    cfg = SaexTrainConfig(
        d_in=D, d_sae=M, total_tokens=B, sparsity_coefficient=0.7, sparsity_loss=kind,
        gated=gated, decoder_norm_weighted=weighted, recip_eps=0.3, tanh_stretch=2.0,
    )  # fmt: skip
    leaves = _leaves(gated)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense, dense_grads = _terms_and_grads(leaves, x, cfg, max_density=0.0)
    sparse, sparse_grads = _terms_and_grads(leaves, x, cfg, max_density=1.0)
    assert "z" not in dense and sparse["ghost"].item() == 0.0
    # a partial support, with gated pairs where the gate is open but the magnitude is off
    assert 0.05 < sparse["l0"].item() / M < 0.6
    for key in ("loss", "fvu", "sparsity", "gated_aux", "l0"):
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-12, atol=1e-12)
    assert torch.equal(sparse["fired"], dense["fired"]) and not bool(dense["fired"].all())
    for name, got, want in zip(("W_enc", "b_enc", "s", "W_dec", "b_dec", "s_gate", "b_gate"),
                               sparse_grads, dense_grads):  # fmt: skip
        assert float(want.abs().max()) > 0, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_dense_support_and_ghost_grads_take_the_dense_path():
    from saeflow.saex_support import support_loss_terms

    cfg = SaexTrainConfig(d_in=D, d_sae=M, total_tokens=B, sparsity_coefficient=0.1)
    leaves = _leaves(False)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert support_loss_terms(leaves, x, cfg, 0.1, max_density=0.01) is None
    assert support_loss_terms(leaves, x, cfg, 0.1, max_density=1.0) is not None
    ghost = SaexTrainConfig(d_in=D, d_sae=M, total_tokens=B, sparsity_coefficient=0.1,
                            ghost_grads=True)  # fmt: skip
    assert support_loss_terms(leaves, x, ghost, 0.1, max_density=1.0) is None


def test_training_steps_on_the_support_follow_the_dense_ones():
    """Twenty float64 Adam steps (clip, update projection, unit decoder): the two paths stay
    within rounding of each other."""
    torch.manual_seed(0)
    x = torch.randn(512, D, dtype=torch.float64) @ torch.randn(D, D, dtype=torch.float64)
    cfg = SaexTrainConfig(d_in=D, d_sae=M, total_tokens=512 * 20, batch_size=64,
                          sparsity_coefficient=0.2, lr=1e-2, lr_warmup_steps=2)  # fmt: skip
    states, l0s = [], []
    for max_density in (0.0, 1.0):
        state = init_state(cfg, x[:64].float())
        state.leaves = [leaf.detach().double().requires_grad_() for leaf in state.leaves]
        state.optimizer = torch.optim.Adam(state.leaves, lr=cfg.lr, betas=(0.0, 0.99))
        rows = [train_step(state, x[i * 25 % 448 :][:64], cfg, max_density) for i in range(20)]
        states.append(state)
        l0s.append([row["l0"] for row in rows])
    assert 0 < min(l0s[1]) and max(l0s[1]) < M  # partial supports all along
    torch.testing.assert_close(torch.tensor(l0s[0]), torch.tensor(l0s[1]))
    for a, b in zip(*(s.leaves for s in states)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
