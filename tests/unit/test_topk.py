"""saeflow.topk (TopK SAE math, trainer, SAELens layout) and saeflow.batches (activation stream)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from acts_files import write_acts
from sae_lens import SAE, TopKSAE
from safetensors.torch import load_file
from torch import Tensor

from saeflow.batches import ActivationBatches
from saeflow.topk import (
    TopKParams,
    TopKTrainConfig,
    codes_to_dense,
    decode,
    encode,
    init_state,
    load_topk,
    loss_and_grads,
    topk_rows,
    train_step,
    train_topk,
)

# Tiny shapes: OpenMP hand-offs cost more than they save (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def toy_activations(
    n_tokens: int, n_features: int, d: int, n_active: float, seed: int
) -> tuple[Tensor, Tensor]:
    """saex's toy model: unit-norm random features, sparse nonnegative codes.

    Feature i fires with probability proportional to 0.99**i (mean ``n_active`` features per
    token) with a Uniform(0, 1) magnitude; returns (activations (n, d), features (n_features, d)).
    """
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    prob = 0.99 ** torch.arange(n_features, dtype=torch.float64)
    prob = (prob / prob.sum() * n_active).clamp(max=1).float()
    on = torch.rand(n_tokens, n_features, generator=gen) < prob
    codes = on * torch.rand(n_tokens, n_features, generator=gen)
    return codes @ features, features


# ---------------------------------------------------------------------- gradients
def autograd_loss(
    params: TopKParams,
    x: Tensor,
    k: int,
    dead: Tensor | None,
    k_aux: int,
    coef: float,
    chosen: Tensor | None = None,
) -> Tensor:
    """The documented loss written plainly with dense tensors, for autograd; ``chosen`` (B, k)
    fixes the latents of each token instead of the exact top k."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (x - b_dec) @ W_enc + b_enc
    idx = pre.topk(k, dim=1).indices if chosen is None else chosen
    vals = pre.gather(1, idx)
    recon = torch.zeros_like(pre).scatter(1, idx, vals.relu()) @ W_dec + b_dec
    variance = (x - x.mean(0)).pow(2).sum()
    loss = (recon - x).pow(2).sum() / variance
    if dead is not None:
        n_dead = int(dead.sum())
        aux_vals, aux_idx = torch.where(dead, pre, -torch.inf).topk(min(k_aux, n_dead), dim=1)
        e_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals.relu()) @ W_dec
        aux = (e_aux - (x - recon).detach()).pow(2).sum() / variance
        loss = loss + coef * min(n_dead / k_aux, 1.0) * aux
    return loss


def random_problem(n_dead: int, seed: int = 0) -> tuple[TopKParams, Tensor, Tensor | None]:
    """Float64 params, a batch (64, 12) and a dead mask with ``n_dead`` latents (or None)."""
    B, d, m = 64, 12, 96
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(m, d, dtype=torch.float64, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    # b_enc shifted down so that some selected pre-activations are negative (ReLU'd to 0)
    params = TopKParams(
        torch.randn(d, m, dtype=torch.float64, generator=gen) * 0.5,
        torch.randn(m, dtype=torch.float64, generator=gen) - 3.5,
        W_dec,
        torch.randn(d, dtype=torch.float64, generator=gen) * 0.3,
    )
    x = torch.randn(B, d, dtype=torch.float64, generator=gen)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=gen)[:n_dead]] = True
    return params, x, (dead if n_dead else None)


def assert_matches_autograd(
    ours: Any, params: TopKParams, x: Tensor, k: int, mask: Tensor | None, k_aux: int,
    coef: float, chosen: Tensor | None = None,
) -> None:  # fmt: skip
    leaves = TopKParams(*(p.clone().requires_grad_() for p in params))
    ref = autograd_loss(leaves, x, k, mask, k_aux, coef, chosen)
    ref.backward()
    assert (ours.codes.values == 0).any(), "test should exercise the ReLU of selected latents"
    torch.testing.assert_close(ours.loss, ref.detach(), rtol=1e-12, atol=0)
    for name, mine, leaf in zip(TopKParams._fields, ours.grads, leaves):
        assert leaf.grad is not None
        rel = float((mine - leaf.grad).norm() / leaf.grad.norm())
        assert rel < 1e-10, f"d{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("n_dead", [0, 5, 40])
def test_manual_gradients_equal_autograd_float64(n_dead: int) -> None:
    k, k_aux, coef = 8, 10, 0.25
    params, x, mask = random_problem(n_dead)
    ours = loss_and_grads(params, x, k, dead_mask=mask, k_aux=k_aux, auxk_coef=coef)
    assert_matches_autograd(ours, params, x, k, mask, k_aux, coef)


@pytest.mark.parametrize("n_dead", [0, 40])
def test_bf16_selection_is_near_exact_and_its_gradients_exact(n_dead: int) -> None:
    """selection_dtype=bfloat16 chooses the latents from a bf16 GEMM: the choice is the exact
    top k up to bf16 rounding, and loss and gradients are exact (float64 here) for that choice."""
    k, k_aux, coef = 8, 10, 0.25
    params, x, mask = random_problem(n_dead, seed=1)
    ours = loss_and_grads(params, x, k, dead_mask=mask, k_aux=k_aux, auxk_coef=coef,
                          selection_dtype=torch.bfloat16)  # fmt: skip
    chosen = ours.codes.indices
    assert_matches_autograd(ours, params, x, k, mask, k_aux, coef, chosen)
    exact = (x - params.b_dec) @ params.W_enc + params.b_enc
    kth = exact.topk(k, dim=1).values[:, -1:]
    # bf16 rounds the inputs, the products' sum and the output, each by at most 2^-8 relative:
    # |pre_bf16 - pre| <= 2^-6 (|xc| @ |W_enc| + |b_enc|) bounds them all with room to spare
    bound = 2**-6 * ((x - params.b_dec).abs() @ params.W_enc.abs() + params.b_enc.abs())
    assert (exact.gather(1, chosen) >= kth - 2 * bound.amax(dim=1, keepdim=True)).all()
    exact_choice = exact.topk(k, dim=1).indices.sort(dim=1).values
    differ = (chosen.sort(dim=1).values != exact_choice).any(dim=1).float().mean()
    assert 0 < differ < 0.5, f"{differ:.2f} of the rows chose differently"


@pytest.mark.parametrize("shape", [(512, 9216, 32), (300, 1280, 32), (9, 640, 5), (50, 96, 8)])
def test_topk_rows_selects_the_top_k(shape: tuple[int, int, int]) -> None:
    B, m, k = shape
    pre = torch.randn(B, m) * torch.rand(B, 1) * 3  # rows on different scales
    vals, idx = topk_rows(pre, k)
    ref_idx = pre.topk(k, dim=1).indices
    assert torch.equal(idx.sort(dim=1).values, ref_idx.sort(dim=1).values)
    assert torch.equal(pre.gather(1, idx), vals)


def test_topk_rows_with_ties_and_nans() -> None:
    pre = torch.randn(64, 1280).round()  # many exact ties at the k-th value
    vals, idx = topk_rows(pre, 32)
    assert torch.equal(vals.sort(dim=1).values, pre.topk(32, dim=1).values.sort(dim=1).values)
    assert torch.equal(pre.gather(1, idx), vals)
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "an entry was picked twice"
    pre[3, 5] = float("nan")  # falls back to torch.topk's NaN ordering
    assert torch.equal(topk_rows(pre, 32)[1], pre.topk(32, dim=1, sorted=False)[1])


# ---------------------------------------------------------------------- toy model training
TOY = {"n_tokens": 32768, "n_features": 64, "d": 32, "n_active": 5}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One TopK SAE trained on the toy model (shared by the tests that read its outputs)."""
    root = tmp_path_factory.mktemp("toy")
    acts, features = toy_activations(**TOY, seed=0)
    path = write_acts(root / "acts.h5", acts, chunk_tokens=1024)
    cfg = TopKTrainConfig(
        d_in=TOY["d"],
        d_sae=2 * TOY["n_features"],
        k=TOY["n_active"],
        total_tokens=600_000,
        batch_size=1024,
        lr_warmup_steps=20,
        dead_tokens_threshold=50_000,
        hook_name="toy.hook",
        model_name="toy",
        dataset="toy",
    )
    stats = train_topk(path, root / "sae", cfg, root / "ckpt", progress=False)
    return {"root": root, "acts": acts, "features": features, "cfg": cfg, "stats": stats}


def test_toy_model_features_are_recovered(toy_run: dict[str, Any]) -> None:
    W_dec = load_topk(toy_run["root"] / "sae").params.W_dec
    max_cos = (toy_run["features"] @ W_dec.T).max(dim=1).values  # per true feature
    assert max_cos.mean() >= 0.9, f"mean max cosine {float(max_cos.mean()):.3f}"
    assert toy_run["stats"]["fvu"] < 0.3


def test_training_log_is_written_beside_the_output(toy_run: dict[str, Any]) -> None:
    with (toy_run["root"] / "sae.train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == toy_run["cfg"].total_steps
    assert float(rows[-1]["fvu"]) < float(rows[0]["fvu"])
    assert {"loss", "fvu", "l0", "dead_fraction", "auxk_loss"} <= rows[0].keys()


def test_decoder_rows_stay_unit_norm(toy_run: dict[str, Any]) -> None:
    W_dec = load_topk(toy_run["root"] / "sae").params.W_dec
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(W_dec.shape[0]), atol=1e-5, rtol=0)


def test_step_projects_the_decoder_gradient_and_renormalises() -> None:
    cfg = TopKTrainConfig(d_in=16, d_sae=48, k=4, total_tokens=10**6, lr=1e-2, lr_warmup_steps=0)
    state = init_state(cfg, torch.zeros(16))
    x = torch.randn(256, 16)
    for _ in range(3):
        W_before = state.leaves[2].clone()
        train_step(state, x, cfg)
        grad = state.leaves[2].grad
        assert grad is not None
        # the gradient Adam saw had no component along the rows it was computed at
        assert torch.linalg.vecdot(grad, W_before).abs().max() < 1e-6 * grad.norm(dim=1).max()
        assert not torch.equal(state.leaves[2], W_before)
        torch.testing.assert_close(state.leaves[2].norm(dim=1), torch.ones(48), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- checkpoint + resume
def test_resume_gives_bitwise_identical_weights(tmp_path: Path) -> None:
    acts, _ = toy_activations(5000, 32, 16, 3, seed=1)
    path = write_acts(tmp_path / "acts.h5", acts, chunk_tokens=500)
    cfg = TopKTrainConfig(
        d_in=16,
        d_sae=48,
        k=3,
        total_tokens=40 * 256,
        batch_size=256,
        lr_warmup_steps=5,
        dead_tokens_threshold=1000,  # latents die within the run: AuxK and counters resume too
        checkpoint_every_steps=7,
        log_every_steps=3,
        buffer_tokens=2000,
    )
    whole = train_topk(path, tmp_path / "whole", cfg, tmp_path / "ck_whole", progress=False)
    # stopped at a checkpoint step, as a killed run resumes from its last checkpoint
    part = train_topk(
        path, tmp_path / "split", cfg, tmp_path / "ck_split", progress=False, stop_after_steps=14
    )
    assert part["steps"] == 14 and not (tmp_path / "split").exists()
    split = train_topk(path, tmp_path / "split", cfg, tmp_path / "ck_split", progress=False)

    assert whole["auxk_loss"] > 0, "test should exercise the AuxK path"
    a = load_file(tmp_path / "whole" / "sae_weights.safetensors")
    b = load_file(tmp_path / "split" / "sae_weights.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with (tmp_path / "split.train_log.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    # the log and the final statistics (saved in cfg.json) match too, timings aside
    logs = []
    for name in ("whole", "split"):
        with (tmp_path / f"{name}.train_log.csv").open() as f:
            logs.append([{k: v for k, v in r.items() if k != "tokens_per_s"}
                         for r in csv.DictReader(f)])
    assert logs[0] == logs[1]
    assert {k: v for k, v in whole.items() if k != "tokens_per_s"} == {
        k: v for k, v in split.items() if k != "tokens_per_s"
    }


# ---------------------------------------------------------------------- SAELens layout
def test_sae_lens_loads_the_same_encoder(toy_run: dict[str, Any]) -> None:
    out = toy_run["root"] / "sae"
    sae = SAE.load_from_disk(out)
    ours = load_topk(out)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == ours.k == toy_run["cfg"].k
    assert sae.cfg.metadata.hook_name == "toy.hook"
    x = toy_run["acts"][:2048]
    with torch.no_grad():
        theirs = sae.encode(x)
        codes = encode(ours.params, x, ours.k)
        assert torch.equal(theirs, codes_to_dense(codes, sae.cfg.d_sae))
        torch.testing.assert_close(
            sae.decode(theirs), decode(ours.params, codes), atol=1e-6, rtol=0
        )


# ---------------------------------------------------------------------- ActivationBatches
N_INDEXED = 20_500  # 4 blocks of 5,000 tokens and a short one of 500


@pytest.fixture
def indexed_acts(tmp_path: Path) -> Path:
    """Tokens whose first column is the row number (so batches can be traced back)."""
    acts = torch.randn(N_INDEXED, 8)
    acts[:, 0] = torch.arange(N_INDEXED, dtype=torch.float32)
    return write_acts(tmp_path / "indexed.h5", acts, chunk_tokens=1000)


def test_batches_resume_exactly(indexed_acts: Path) -> None:
    with ActivationBatches(indexed_acts, 768, seed=3, buffer_tokens=10_000) as stream:
        expected = [next(stream) for _ in range(60)]  # crosses buffers and two epochs
    with ActivationBatches(indexed_acts, 768, seed=3, buffer_tokens=10_000) as stream:
        for _ in range(23):
            next(stream)
        state = stream.state_dict()
    with ActivationBatches(indexed_acts, 768, seed=3, buffer_tokens=10_000) as stream:
        stream.load_state_dict(state)
        resumed = [next(stream) for _ in range(37)]
    assert all(torch.equal(a, b) for a, b in zip(expected[23:], resumed))
    assert all(b.shape == (768, 8) and b.dtype == torch.float32 for b in resumed)


@pytest.mark.parametrize("seed", range(5))  # the short block lands in different buffers
def test_batches_serve_every_row_once_per_epoch(indexed_acts: Path, seed: int) -> None:
    with ActivationBatches(indexed_acts, 768, seed=seed, buffer_tokens=10_000) as stream:
        rows = torch.cat([next(stream)[:, 0] for _ in range(81)]).long()  # 3 epochs and a bit
        block, per_buffer = stream.block_tokens, stream.blocks_per_buffer
    assert (block, per_buffer) == (5000, 2)
    epochs = rows[: 3 * N_INDEXED].view(3, N_INDEXED)
    for epoch in epochs:
        assert torch.equal(epoch.sort().values, torch.arange(N_INDEXED))
    assert not torch.equal(epochs[0], epochs[1]), "each epoch should be a new permutation"
    # rows are mixed across the blocks of a buffer, not served block by block
    assert len(np.unique(epochs[0, :768].numpy() // block)) > 1


def test_batches_reject_a_foreign_state(indexed_acts: Path) -> None:
    with ActivationBatches(indexed_acts, 768, seed=3) as stream:
        state = stream.state_dict()
    with ActivationBatches(indexed_acts, 512, seed=3) as other, pytest.raises(ValueError):
        other.load_state_dict(state)


def test_config_defaults_follow_the_papers() -> None:
    cfg = TopKTrainConfig(d_in=576, d_sae=9216, k=32, total_tokens=10**6)
    assert cfg.lr == pytest.approx(2e-4 / (9216 / 2**14) ** 0.5)
    assert cfg.k_aux == 288 and cfg.auxk_coef == 1 / 32 and cfg.batch_size == 4096
    with pytest.raises(ValueError, match="k"):
        TopKTrainConfig(d_in=8, d_sae=4, k=5, total_tokens=10)


def test_stable_argsort_matches_torch_stable_sort() -> None:
    from saeflow.topk import _stable_argsort

    keys = torch.randint(0, 300, (5000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_stable_argsort(keys, 300), keys.argsort(stable=True))
    assert torch.equal(_stable_argsort(keys, 2**17), keys.argsort(stable=True))  # int32 path
