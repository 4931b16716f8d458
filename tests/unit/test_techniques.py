"""saex's techniques (saeflow.techniques, saeflow.saex_train): values and gradients against float64
references, the limits of the smooth L0 losses, and ghost grads reviving dead latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeflow import techniques as T
from saeflow import toy
from saeflow.saex_train import SaexTrainConfig, init_state, train_step


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _codes(b=6, m=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.rand(b, m, generator=gen, dtype=torch.float64) * 2
    z[torch.rand(b, m, generator=gen) < 0.5] = 0.0  # sparse, with exact zeros
    z[:, 0] = 0.7  # no all-zero token (hoyer is 0/0 there)
    return z


def _reference(z: np.ndarray, w: np.ndarray, kind: str, eps: float, stretch: float):
    """Per-token value and d(sum of values)/dz in numpy float64, from the closed forms."""
    a = z * w
    if kind == "l1":
        v, g = a.sum(1), np.where(z > 0, 1.0, 0.0) * w
    elif kind == "l1_sqrt":
        v = np.sqrt(a).sum(1)
        g = np.where(a > 0, 0.5 / np.sqrt(np.where(a > 0, a, 1.0)), 0.0) * w
    elif kind == "tanh":
        v, g = np.tanh(stretch * a).sum(1), stretch * (1 - np.tanh(stretch * a) ** 2) * w
    elif kind == "recip":
        v, g = (a / (a + eps)).sum(1), eps / (a + eps) ** 2 * w
    else:  # hoyer: S^2 / Q, dH/da_i = 2S/Q - 2 S^2 a_i / Q^2
        S, Q = a.sum(1, keepdims=True), (a**2).sum(1, keepdims=True)
        v, g = (S**2 / Q)[:, 0], (2 * S / Q - 2 * S**2 * a / Q**2) * w
    # at an exact zero the penalties take |z|'s subgradient 0 (ReLU codes get none there anyway)
    return v, np.where(z > 0, g, 0.0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", T.SPARSITY_LOSSES)
def test_sparsity_loss_and_gradient_match_float64_closed_forms(kind, weighted):
    z64 = _codes()
    w64 = torch.linspace(0.5, 1.5, z64.shape[1], dtype=torch.float64)
    z = z64.float().requires_grad_(True)
    w = w64.float() if weighted else None
    value = T.sparsity_penalty(z, kind, eps=0.3, stretch=2.0, decoder_norms=w)
    value.sum().backward()
    w_np = w64.numpy() if weighted else np.ones(z64.shape[1])
    ref_v, ref_g = _reference(z64.numpy(), w_np, kind, 0.3, 2.0)
    np.testing.assert_allclose(value.detach().double().numpy(), ref_v, rtol=2e-6)
    assert z.grad is not None
    np.testing.assert_allclose(z.grad.double().numpy(), ref_g, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["l1", "tanh", "recip", "hoyer"])
def test_sparsity_gradients_pass_finite_differences(kind):
    z = (_codes() + 0.05).requires_grad_(True)  # away from the kinks at 0
    w = torch.linspace(0.5, 1.5, z.shape[1], dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda zz, ww: T.sparsity_penalty(zz, kind, eps=0.3, stretch=2.0, decoder_norms=ww), (z, w)
    )


def test_limits_of_the_smooth_l0_losses():
    z = _codes().float()
    l0, l1 = (z > 0).sum(1).float(), z.sum(1)
    torch.testing.assert_close(T.sparsity_penalty(z, "recip", eps=1e-7), l0, rtol=1e-5, atol=0)
    torch.testing.assert_close(T.sparsity_penalty(z, "recip", eps=1e6) * 1e6, l1, rtol=1e-4, atol=0)
    torch.testing.assert_close(T.sparsity_penalty(z, "tanh", stretch=1e6), l0)
    torch.testing.assert_close(T.sparsity_penalty(z, "tanh", stretch=1e-4) / 1e-4, l1, rtol=1e-4, atol=0)
    hoyer = T.sparsity_penalty(z, "hoyer")
    assert torch.all(hoyer >= 1 - 1e-6) and torch.all(hoyer <= l0 + 1e-5)  # 1 <= H <= L0
    one_hot, flat = torch.zeros(1, 8), torch.full((1, 8), 0.3)
    one_hot[0, 3] = 2.0
    assert T.sparsity_penalty(one_hot, "hoyer").item() == pytest.approx(1.0)
    assert T.sparsity_penalty(flat, "hoyer").item() == pytest.approx(8.0)


def test_recip_schedule_anneals_log_linearly_then_holds():
    assert T.recip_eps(0, [(100, 0.01)]) == pytest.approx(1.0)
    assert T.recip_eps(50, [(100, 0.01)]) == pytest.approx(0.1)
    assert T.recip_eps(100, [(100, 0.01)]) == T.recip_eps(10**6, [(100, 0.01)]) == 0.01


def _ghost_reference(x, x_hat, pre, s, W_dec, dead, eps=1e-3):
    """saex's dm_ghost_grads in numpy float64 (value only)."""
    ghost = (np.log1p(np.exp(pre)) * s * dead) @ W_dec
    res = x - x_hat
    ghost = ghost * (np.linalg.norm(res, axis=-1, keepdims=True)
                     / (np.linalg.norm(ghost, axis=-1, keepdims=True) * 2 + eps))
    gl = (ghost - res) ** 2
    gl = gl * ((x_hat - x) ** 2 / (gl + eps))
    return gl.mean(-1).mean() * dead.mean()


def test_ghost_loss_matches_numpy_and_finite_differences():
    gen = torch.Generator().manual_seed(2)
    B, d, m = 5, 4, 7
    x, x_hat = torch.randn(B, d, generator=gen, dtype=torch.float64), torch.randn(B, d, generator=gen, dtype=torch.float64)
    pre = torch.randn(B, m, generator=gen, dtype=torch.float64).requires_grad_(True)
    s = (torch.rand(m, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    W_dec = torch.randn(m, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    dead = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    value = T.dm_ghost_loss(x, x_hat, pre, s, W_dec, dead)
    ref = _ghost_reference(x.numpy(), x_hat.numpy(), pre.detach().numpy(), s.detach().numpy(),
                           W_dec.detach().numpy(), dead.numpy().astype(float))
    assert value.item() == pytest.approx(ref, rel=1e-12)
    # the stop-gradients make the gradient that of the ghost term with its scales held fixed:
    # that function (scales frozen at these inputs) passes finite differences, and its gradient
    # equals dm_ghost_loss's
    scale, ratio = _frozen_scales(x, x_hat, pre, s, W_dec, dead)

    def frozen(p, ss, W):
        ghost = (torch.nn.functional.softplus(p) * ss * dead) @ W * scale
        return ((ghost - (x - x_hat)).square() * ratio).mean(-1).mean() * dead.double().mean()

    assert torch.autograd.gradcheck(frozen, (pre, s, W_dec))
    want = torch.autograd.grad(frozen(pre, s, W_dec), (pre, s, W_dec))
    got = torch.autograd.grad(T.dm_ghost_loss(x, x_hat, pre, s, W_dec, dead), (pre, s, W_dec))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
    assert torch.all(got[0][:, ~dead] == 0)  # alive latents get no ghost gradient
    assert T.dm_ghost_loss(x, x_hat, pre, s, W_dec, torch.zeros(m, dtype=torch.bool)).item() == 0


def _frozen_scales(x, x_hat, pre, s, W_dec, dead, eps=1e-3):
    with torch.no_grad():
        g0 = (torch.nn.functional.softplus(pre) * s * dead) @ W_dec
        res = x - x_hat
        scale = res.norm(dim=-1, keepdim=True) / (g0.norm(dim=-1, keepdim=True) * 2 + eps)
        gl0 = (g0 * scale - res).square()
        return scale, (x_hat - x).square() / (gl0 + eps)


def test_decoder_projection_norms_and_input_norms():
    gen = torch.Generator().manual_seed(4)
    W, g = torch.randn(6, 5, generator=gen) * 3, torch.randn(6, 5, generator=gen)
    p = T.project_parallel(W, g)
    torch.testing.assert_close((p * W).sum(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(T.project_parallel(W, p), p)  # idempotent
    torch.testing.assert_close(T.restrict_decoder_norm(W, "exact").norm(dim=1), torch.ones(6))
    small = W / 10
    torch.testing.assert_close(T.restrict_decoder_norm(small, "lte"), small)
    assert torch.all(T.restrict_decoder_norm(W, "lte").norm(dim=1) <= 1 + 1e-6)
    x = torch.randn(7, 16, generator=gen) * torch.arange(1, 8).unsqueeze(1)
    wes, _ = T.normalize_input(x, "wes")
    torch.testing.assert_close(wes.norm(dim=1), torch.full((7,), 4.0))
    mean, c = T.normalize_input(x, "wes-mean")
    assert mean.norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-5) and c.unique().numel() == 1
    clip, _ = T.normalize_input(x, "wes-clip")
    assert torch.all(clip.norm(dim=1) <= 4.0 + 1e-5)


def test_pseudoinverse_and_orthogonal_init():
    gen = torch.Generator().manual_seed(5)
    W_enc, W_dec = T.pseudoinverse_init(torch.randn(8, 20, generator=gen))
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(20))
    torch.testing.assert_close(W_dec @ W_enc, torch.linalg.pinv(W_enc) @ W_enc, atol=1e-4, rtol=0)
    torch.testing.assert_close(W_enc @ W_dec, torch.eye(8), atol=1e-4, rtol=0)  # left inverse
    Q = T.orthogonal_init(6, 10, gen)
    torch.testing.assert_close(Q @ Q.T, torch.eye(6), atol=1e-5, rtol=0)


def _dead_run(ghost: bool, steps: int = 300) -> float:
    """Fraction of a deliberately killed half of the latents that fires after training."""
    cfg = toy.ToyConfig(d=16, n_features=32, mean_active=2.0, seed=0)
    truth = toy.make_truth(cfg)
    gen = torch.Generator().manual_seed(1)
    c = SaexTrainConfig(d_in=16, d_sae=32, total_tokens=steps * 256, batch_size=256,
                        sparsity_coefficient=0.05, lr=3e-3, lr_warmup_steps=1,
                        ghost_grads=ghost, dead_after_steps=5)
    state = init_state(c, toy.sample_acts(truth, cfg, 256, gen))
    with torch.no_grad():
        state.leaves[1][16:] = -4.0  # b_enc: pre-activations far below 0, so no ReLU gradient
    for _ in range(steps):
        train_step(state, toy.sample_acts(truth, cfg, 256, gen), c)
    x = toy.sample_acts(truth, cfg, 4096, gen)
    out = T.relu_forward(T.ReluParams(*state.leaves), x)
    return float((out.z[:, 16:] > 0).any(0).float().mean())


def test_ghost_grads_revive_latents_that_plain_training_leaves_dead():
    assert _dead_run(ghost=False) == 0.0
    assert _dead_run(ghost=True) >= 0.5


def _write_toy(tmp_path):
    cfg = toy.ToyConfig(d=16, n_features=32, n_tokens=4096, mean_active=2.0, chunk_tokens=512)
    toy.write_toy(cfg, tmp_path / "acts.h5", tmp_path / "dictionary.h5", "t")
    return tmp_path / "acts.h5"


SAEX_VARIANTS = [
    {},
    {"sparsity_loss": "recip", "recip_anneal_steps": 4, "ghost_grads": True, "dead_after_steps": 2,
     "decoder_init": "pseudoinverse", "project_decoder": "grads", "input_norm": "wes"},
    {"sparsity_loss": "tanh", "decoder_norm_weighted": True, "restrict_dec_norm": "lte",
     "input_norm": "wes-mean", "encoder_init": "orthogonal", "decoder_init": "orthogonal",
     "b_dec_init": "mean"},
    {"gated": True, "sparsity_loss": "tanh", "input_norm": "wes-mean"},
]


@pytest.mark.parametrize("options", SAEX_VARIANTS)
def test_saex_resume_is_bitwise_and_sae_lens_encodes_like_the_trained_model(options, tmp_path):
    from safetensors.torch import load_file

    from saeflow.saes import load_sae
    from saeflow.saex_train import train_saex

    acts = _write_toy(tmp_path)
    cfg = SaexTrainConfig(d_in=16, d_sae=32, total_tokens=8 * 256, batch_size=256,
                          sparsity_coefficient=0.1, lr=3e-3, lr_warmup_steps=2,
                          checkpoint_every_steps=3, **options)
    train_saex(acts, tmp_path / "whole", cfg, tmp_path / "ck_whole", progress=False)
    train_saex(acts, tmp_path / "split", cfg, tmp_path / "ck_split", progress=False,
               stop_after_steps=3)
    assert not (tmp_path / "split").exists()
    train_saex(acts, tmp_path / "split", cfg, tmp_path / "ck_split", progress=False)
    a, b = (load_file(tmp_path / n / "sae_weights.safetensors") for n in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # SAELens's standard SAE, loaded from the folder, encodes as the trained model did
    ck = torch.load(tmp_path / "ck_whole" / "saex_checkpoint.pt", weights_only=True)
    leaves = ck["state"]["leaves"]
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)) + 0.1
    xn, c = T.normalize_input(x, cfg.input_norm)
    if cfg.input_norm == "wes-mean":  # the folded factor is the run's mean batch factor
        xn = x * (ck["state"]["norm_sum"] / ck["state"]["step"])
    if cfg.gated:
        z = T.gated_forward(T.ReluParams(*leaves[:5]), leaves[5], leaves[6], xn).z
    else:
        z = T.relu_forward(T.ReluParams(*leaves), xn).z
    sae = load_sae(tmp_path / "whole")
    assert type(sae).__name__ == ("GatedSAE" if cfg.gated else "StandardSAE")
    with torch.no_grad():
        got = sae.encode(x)
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-5)
    assert c.shape == (64, 1)


def test_gated_forward_and_aux_loss_match_numpy_float64():
    from saeflow.saex_train import loss_terms

    gen = torch.Generator().manual_seed(5)
    d, m, b = 6, 10, 40
    p = T.ReluParams(
        torch.randn(d, m, generator=gen, dtype=torch.float64),
        torch.randn(m, generator=gen, dtype=torch.float64) * 0.5,
        torch.rand(m, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(m, d, generator=gen, dtype=torch.float64),
        torch.randn(d, generator=gen, dtype=torch.float64) * 0.1,
    )
    s_gate = torch.randn(m, generator=gen, dtype=torch.float64)
    b_gate = torch.randn(m, generator=gen, dtype=torch.float64) - 0.5
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    out = T.gated_forward(p, s_gate, b_gate, x)
    W, be, s, D, bd = (t.numpy() for t in p)
    xw = (x.numpy() - bd) @ W
    soft = np.log1p(np.exp(s_gate.numpy()))
    gate = xw * soft * s + b_gate.numpy()
    z = (gate > 0) * np.maximum(xw + be, 0) * s
    assert 0 < (z > 0).mean() < 1 and ((gate > 0) & (xw + be <= 0)).any()
    np.testing.assert_allclose(out.z.numpy(), z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.x_hat.numpy(), z @ D + bd, rtol=1e-12, atol=1e-12)
    aux = ((np.maximum(gate, 0) @ D + bd - x.numpy()) ** 2).sum(-1)
    np.testing.assert_allclose(T.gated_aux_loss(out.gate_pre, p.W_dec, p.b_dec, x).numpy(), aux)
    # the aux loss reaches the encoder and the gate only (stop-gradient on the decoder)
    cfg = SaexTrainConfig(d_in=d, d_sae=m, total_tokens=10, sparsity_coefficient=0.0, gated=True)
    leaves = [t.clone().requires_grad_() for t in (*p, s_gate, b_gate)]
    terms = loss_terms(leaves, x, cfg, 0, torch.zeros(m, dtype=torch.bool))
    terms["gated_aux"].backward()
    assert leaves[3].grad is None  # W_dec (b_dec still enters through the input centring)
    assert leaves[0].grad is not None and leaves[6].grad is not None
    assert float(leaves[0].grad.norm()) > 0 and float(leaves[6].grad.norm()) > 0
