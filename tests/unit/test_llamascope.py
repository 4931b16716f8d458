"""Llama Scope's training recipe in saeflow.topk: decoder-norm-aware TopK, dataset-wise activation
normalisation folded at save time, k warm-up, LR warm-up + cool-down, gradient clipping, and the
TopK -> JumpReLU conversion (docs: TopKTrainConfig; source: OpenMOSS Language-Model-SAEs)."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from acts_files import write_acts
from sae_lens import SAE, JumpReLUSAE, TopKSAE
from safetensors.torch import load_file

from saeflow.topk import (
    TopKParams,
    TopKTrainConfig,
    codes_to_dense,
    dataset_scale,
    decode,
    encode,
    fold_params,
    init_state,
    jumprelu_threshold,
    k_at,
    load_topk,
    loss_and_grads,
    lr_at,
    train_step,
    train_topk,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_acts(n_tokens: int, n_features: int, d: int, n_active: float, seed: int, scale: float):
    """Sparse nonnegative codes of unit-norm random features, times ``scale`` (residual streams
    have norms far from sqrt(d)), plus an offset (so b_dec matters)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    prob = torch.full((n_features,), n_active / n_features)
    on = torch.rand(n_tokens, n_features, generator=gen) < prob
    codes = on * torch.rand(n_tokens, n_features, generator=gen)
    offset = torch.randn(d, generator=gen) * 0.2
    return scale * (codes @ features + offset), features


def random_params(d: int, m: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> TopKParams:
    """Decoder rows with norms spread over [0.2, 2] (what the recipe's free decoder reaches)."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(m, d, generator=gen, dtype=dtype)
    W_dec *= (0.2 + 1.8 * torch.rand(m, 1, generator=gen, dtype=dtype)) / W_dec.norm(
        dim=1, keepdim=True
    )
    return TopKParams(
        torch.randn(d, m, generator=gen, dtype=dtype) * 0.5,
        torch.randn(m, generator=gen, dtype=dtype) - 1.0,
        W_dec,
        torch.randn(d, generator=gen, dtype=dtype) * 0.3,
    )


# ---------------------------------------------------------------------- decoder-norm-aware TopK
def test_decoder_norm_aware_gradients_equal_autograd_float64() -> None:
    B, d, m, k = 64, 12, 96, 8
    params = random_params(d, m)
    x = torch.randn(B, d, dtype=torch.float64)
    ours = loss_and_grads(params, x, k, decoder_norm_aware=True)

    leaves = TopKParams(*(p.clone().requires_grad_() for p in params))
    W_enc, b_enc, W_dec, b_dec = leaves
    pre = (x - b_dec) @ W_enc + b_enc
    idx = (pre.relu() * W_dec.norm(dim=1)).topk(k, dim=1).indices  # the documented selection
    recon = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu()) @ W_dec + b_dec
    ref = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    ref.backward()
    plain = loss_and_grads(params, x, k)
    assert not torch.equal(plain.codes.indices.sort(1).values, ours.codes.indices.sort(1).values)
    torch.testing.assert_close(ours.loss, ref.detach(), rtol=1e-12, atol=0)
    assert torch.equal(ours.codes.indices.sort(1).values, idx.sort(1).values)
    for name, mine, leaf in zip(TopKParams._fields, ours.grads, leaves):
        assert leaf.grad is not None
        rel = float((mine - leaf.grad).norm() / leaf.grad.norm())
        assert rel < 1e-10, f"d{name}: relative error {rel:.2e}"


def test_encode_selects_by_decoder_norm() -> None:
    params = random_params(10, 40)
    x = torch.randn(30, 10, dtype=torch.float64)
    codes = encode(params, x, 5, decoder_norm_aware=True)
    pre = (x - params.b_dec) @ params.W_enc + params.b_enc
    score = pre * params.W_dec.norm(dim=1)
    kth = score.topk(5, dim=1).values[:, -1:]
    chosen = torch.zeros_like(pre, dtype=torch.bool).scatter(1, codes.indices, True)
    assert torch.equal(chosen, score >= kth)
    assert torch.equal(codes.values, pre.gather(1, codes.indices).relu())


# ---------------------------------------------------------------------- normalisation, folding
def test_dataset_scale_gives_mean_norm_sqrt_d() -> None:
    x = torch.randn(500, 24) * 7.0 + 3.0
    c = dataset_scale(x)
    assert math.isclose(float((c * x.double()).norm(dim=1).mean()), math.sqrt(24), rel_tol=1e-12)


@pytest.mark.parametrize("aware", [False, True])
def test_folding_gives_the_same_reconstruction_of_raw_inputs(aware: bool) -> None:
    d, m, k, c = 12, 64, 6, 0.37
    params = random_params(d, m)
    x = torch.randn(200, d, dtype=torch.float64) * 5.0
    codes = encode(params, c * x, k, decoder_norm_aware=aware)
    ref = decode(params, codes) / c  # the training frame's reconstruction, in raw units

    folded = TopKParams(*(t.double() for t in fold_params(params, c, aware)))
    fcodes = encode(folded, x, k)  # plain TopK on raw inputs
    assert torch.equal(fcodes.indices.sort(1).values, codes.indices.sort(1).values)
    torch.testing.assert_close(decode(folded, fcodes), ref, rtol=1e-5, atol=1e-5)
    if aware:  # unit decoder rows, codes scaled by the raw-frame decoder norms
        torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(m, dtype=torch.float64))
        norms = params.W_dec.norm(dim=1) / c
        ref_vals = codes_to_dense(codes, m) * norms
        torch.testing.assert_close(codes_to_dense(fcodes, m), ref_vals, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- schedules, clipping
def test_lr_schedule_is_openmoss_constantwithwarmup() -> None:
    cfg = TopKTrainConfig(
        d_in=4, d_sae=8, k=2, total_tokens=100 * 10, batch_size=10, lr=1.0,
        lr_warmup_steps=10, lr_cooldown_steps=20, lr_end_ratio=0.01,
    )  # fmt: skip
    T, W, C, r = 100, 10, 20, 0.01
    for s in range(T):
        ref = min(1.0, (s + 1) / W, r + (1 - r) / C * max(T - s, 1))
        assert math.isclose(lr_at(s, cfg), ref, rel_tol=1e-12), s
    assert lr_at(T - 1, cfg) < 0.06 and lr_at(50, cfg) == 1.0 and lr_at(0, cfg) == 0.1
    no_cool = TopKTrainConfig(d_in=4, d_sae=8, k=2, total_tokens=1000, batch_size=10, lr=1.0)
    assert lr_at(99, no_cool) == 0.1  # the default: 1000-step warm-up, no cool-down


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_k_warmup_schedule(schedule: str) -> None:
    cfg = TopKTrainConfig(
        d_in=4, d_sae=300, k=50, initial_k=200, k_warmup_steps=40, k_schedule=schedule,
        total_tokens=1000, batch_size=10,
    )  # fmt: skip
    ks = [k_at(s, cfg) for s in range(100)]
    assert ks[0] == 200 and all(k == 50 for k in ks[40:])
    assert all(a >= b for a, b in itertools.pairwise(ks))
    p, f = 10 / 40, 3.0
    ref = (
        200 - 150 * p
        if schedule == "linear"
        else 200 - 150 * (1 - math.exp(-f * p)) / (1 - math.exp(-f))
    )
    assert ks[10] == math.ceil(ref)
    assert k_at(5, TopKTrainConfig(d_in=4, d_sae=300, k=50, total_tokens=10, batch_size=10)) == 50


def test_gradient_clipping_scales_to_the_global_norm() -> None:
    cfg = TopKTrainConfig(
        d_in=16, d_sae=48, k=4, total_tokens=10**6, lr=1e-3, lr_warmup_steps=0,
        clip_grad_norm=1e-3, decoder_norm_topk=True, decoder_init_norm=0.5,
    )  # fmt: skip
    state = init_state(cfg, torch.zeros(16))
    x = torch.randn(256, 16) * 3
    before = TopKParams(*(t.detach().clone().double() for t in state.params))
    ref = loss_and_grads(before, x.double(), 4, decoder_norm_aware=True)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in ref.grads))
    assert total > 10 * cfg.clip_grad_norm, "test should clip"
    train_step(state, x, cfg)
    grads = [leaf.grad for leaf in state.leaves]  # what Adam saw, in (m, d) layout
    assert all(g is not None for g in grads)
    expect = [ref.grads.W_enc.t(), ref.grads.b_enc, ref.grads.W_dec, ref.grads.b_dec]
    factor = cfg.clip_grad_norm / (total + 1e-6)
    for g, e in zip(grads, expect):
        assert g is not None
        torch.testing.assert_close(g.double(), e * factor, rtol=1e-4, atol=1e-9)
    # the decoder is free: neither projected nor renormalised
    assert not torch.allclose(state.leaves[2].norm(dim=1), torch.ones(48))


# ---------------------------------------------------------------------- TopK -> JumpReLU
def test_jumprelu_threshold_is_the_kb_th_largest_relu_preactivation() -> None:
    params = TopKParams(*(t.float() for t in random_params(8, 32)))
    x = torch.randn(50, 8)
    theta = jumprelu_threshold(params, x, 3)
    pre = np.maximum(((x - params.b_dec) @ params.W_enc + params.b_enc).numpy(), 0)
    assert theta == float(np.sort(pre.ravel())[::-1][3 * 50 - 1])


# ---------------------------------------------------------------------- end to end
RECIPE = {
    "decoder_norm_topk": True, "decoder_init_norm": 0.5, "activation_norm": "dataset_wise",
    "initial_k": 12, "k_warmup_steps": 15, "k_schedule": "exponential", "lr_warmup_steps": 5,
    "lr_cooldown_steps": 10, "lr_end_ratio": 0.01, "clip_grad_norm": 1.0, "adam_beta2": 0.9999,
}  # fmt: skip


def recipe_cfg(**kw: Any) -> TopKTrainConfig:
    return TopKTrainConfig(
        d_in=16, d_sae=64, k=3, total_tokens=60 * 256, batch_size=256, lr=3e-3,
        dead_tokens_threshold=2000, checkpoint_every_steps=7, log_every_steps=3,
        buffer_tokens=2000, hook_name="toy.hook", model_name="toy", dataset="toy",
        **{**RECIPE, **kw},
    )  # fmt: skip


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("llamascope")
    acts, features = toy_acts(6000, 32, 16, 3, seed=1, scale=40.0)
    path = write_acts(root / "acts.h5", acts, chunk_tokens=500)
    cfg = recipe_cfg()
    stats = train_topk(path, root / "topk", cfg, root / "ck_topk", progress=False)
    jcfg = recipe_cfg(save_as="jumprelu")
    jstats = train_topk(path, root / "jump", jcfg, root / "ck_jump", progress=False)
    return {"root": root, "path": path, "acts": acts, "features": features, "cfg": cfg,
            "stats": stats, "jstats": jstats}  # fmt: skip


def test_recipe_trains_and_resumes_bitwise(recipe_run: dict[str, Any], tmp_path: Path) -> None:
    root, cfg = recipe_run["root"], recipe_run["cfg"]
    assert recipe_run["stats"]["fvu"] < 0.5
    assert recipe_run["stats"]["act_scale"] == pytest.approx(
        dataset_scale(recipe_run["acts"][:256]), rel=0.2
    )  # estimated on the first (shuffled) batch
    part = train_topk(recipe_run["path"], tmp_path / "split", cfg, tmp_path / "ck", progress=False,
                      stop_after_steps=14)  # fmt: skip
    assert part["steps"] == 14 and not (tmp_path / "split").exists()
    split = train_topk(recipe_run["path"], tmp_path / "split", cfg, tmp_path / "ck", progress=False)
    a = load_file(root / "topk" / "sae_weights.safetensors")
    b = load_file(tmp_path / "split" / "sae_weights.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    drop = ("tokens_per_s",)
    assert {k: v for k, v in split.items() if k not in drop} == {
        k: v for k, v in recipe_run["stats"].items() if k not in drop
    }
    with (root / "topk.train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    l0 = [float(r["l0"]) for r in rows]
    assert l0[0] > 3.5 and l0[-1] <= 3.0  # the k warm-up: from initial_k 12 down to 3


def test_sae_lens_round_trip_of_the_folded_topk(recipe_run: dict[str, Any]) -> None:
    out = recipe_run["root"] / "topk"
    sae = SAE.load_from_disk(out)
    ours = load_topk(out)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 3
    torch.testing.assert_close(ours.params.W_dec.norm(dim=1), torch.ones(64))
    x = recipe_run["acts"][:1024]  # raw activations: the normalisation is folded in
    with torch.no_grad():
        theirs = sae.encode(x)
        codes = encode(ours.params, x, 3)
        assert torch.equal(theirs, codes_to_dense(codes, 64))
        fvu = float((sae.decode(theirs) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.5


def test_jumprelu_conversion_matches_topk_where_it_should(recipe_run: dict[str, Any]) -> None:
    root = recipe_run["root"]
    jump = SAE.load_from_disk(root / "jump")
    assert isinstance(jump, JumpReLUSAE)
    w = load_file(root / "jump" / "sae_weights.safetensors")
    t = load_file(root / "topk" / "sae_weights.safetensors")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # same training: same weights
        assert torch.equal(w[name], t[name]), name
    theta = recipe_run["jstats"]["jumprelu_threshold"]
    assert torch.equal(w["threshold"], torch.full((64,), theta)) and theta > 0
    topk = load_topk(root / "topk")
    x = recipe_run["acts"][:2048]
    with torch.no_grad():
        j = jump.encode(x)
        dense = codes_to_dense(encode(topk.params, x, 3), 64)
        pre = (x - topk.params.b_dec) @ topk.params.W_enc + topk.params.b_enc
    top4 = pre.topk(4, dim=1).values
    exact = (top4[:, 2] > theta) & (top4[:, 3] <= theta)  # k-th above, (k+1)-th not
    assert 50 < int(exact.sum()) < 2000, "test should have tokens of both kinds"
    assert torch.equal(j[exact], dense[exact])
    assert not torch.equal(j[~exact], dense[~exact])
    assert 1.5 < float((j > 0).sum(1).float().mean()) < 6  # ~k per token on average


# ---------------------------------------------------------------------- declaring it
def test_family_and_cli_carry_the_recipe(recipe_run: dict[str, Any], tmp_path: Path) -> None:
    from saeflow.saes import FamilyError, expand_family
    from saeflow.train import main

    family = {"model": "m", "corpus": "c", "site": "blocks.0.hook_resid_post",
              "architecture": "topk", "widths": [64], "k": [3], **RECIPE, "save_as": "jumprelu"}  # fmt: skip
    (member,) = expand_family("ls", family).values()
    assert {key: member[key] for key in RECIPE} == RECIPE
    with pytest.raises(FamilyError, match="decoder_norm_topk.*not valid"):
        no_k = {key: v for key, v in family.items() if key != "k"}
        expand_family("ls", {**no_k, "architecture": "standard", "l1_coefficient": [1.0]})
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in RECIPE.items()]
    stats = main([
        "--acts", str(recipe_run["path"]), "--out", str(tmp_path / "sae"), "--architecture",
        "topk", "--d-sae", "64", "--k", "3", "--tokens", str(60 * 256), "--batch-size", "256",
        "--seed", "0", "--checkpoint-dir", str(tmp_path / "ck"), "--lr", "3e-3",
        "--dead-tokens-threshold", "2000", "--checkpoint-every-steps", "7",
        "--log-every-steps", "3", "--buffer-tokens", "2000", "--no-progress", *flags,
    ])  # fmt: skip
    cfg = SAE.load_from_disk(tmp_path / "sae").cfg.metadata.saeflow_train_config  # type: ignore[attr-defined]
    assert {key: cfg[key] for key in RECIPE} == RECIPE
    assert stats["act_scale"] == recipe_run["stats"]["act_scale"]
