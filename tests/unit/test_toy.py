"""Toy data with a known dictionary: the generator's properties, and every architecture recovers it."""

from __future__ import annotations

from typing import Any

import h5py
import pytest
import torch

from saeflow import toy
from saeflow.batches import ActivationBatches
from saeflow.sae_lens_train import SAELensTrainConfig, train_sae_lens
from saeflow.saex_train import SaexTrainConfig, train_saex
from saeflow.topk import TopKTrainConfig, train_topk

CFG = toy.ToyConfig(d=32, n_features=64, n_tokens=32768, mean_active=3.0, seed=0)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "toy1"
    toy.write_toy(CFG, root / "acts.h5", root / "dictionary.h5", "toy1")
    return root


def test_generator_frequencies_and_l0():
    cfg = toy.ToyConfig(d=16, n_features=40, mean_active=5.0, freq_decay=1.0, seed=3)
    truth = toy.make_truth(cfg)
    assert truth.probabilities.sum().item() == pytest.approx(5.0, rel=1e-9)
    assert torch.all(truth.probabilities[:-1] >= truth.probabilities[1:])  # power law, decreasing
    assert torch.allclose(truth.dictionary.norm(dim=1), torch.ones(40, dtype=torch.float64))
    codes = toy.sample_codes(truth, cfg, 20000, torch.Generator().manual_seed(1))
    freq = (codes > 0).double().mean(0)
    assert torch.allclose(freq, truth.probabilities, atol=0.015)  # Bernoulli, 20k draws


def test_generator_correlation_and_magnitudes():
    cfg = toy.ToyConfig(d=8, n_features=20, mean_active=2.0, correlation=1.0,
                        magnitude=2.0, magnitude_log_std=0.5, seed=1)
    codes = toy.sample_codes(toy.make_truth(cfg), cfg, 5000, torch.Generator().manual_seed(0))
    fired = codes > 0
    assert torch.equal(fired[:, 0::2], fired[:, 1::2])  # correlation 1: pairs always fire together
    logs = codes[fired].log()
    assert logs.median().exp().item() == pytest.approx(2.0, rel=0.05)
    assert logs.std().item() == pytest.approx(0.5, rel=0.05)


def test_written_file_is_read_like_cached_activations(toy_files):
    with h5py.File(toy_files / "acts.h5") as h5:
        acts = h5["acts"]
        assert isinstance(acts, h5py.Dataset)
        assert acts.shape == (CFG.n_tokens, CFG.d) and h5.attrs["complete"] == 1
        assert h5.attrs["site"] == "toy" and h5.attrs["corpus"] == "toy1"
    with ActivationBatches(toy_files / "acts.h5", 1024, seed=0) as batches:
        assert next(batches).shape == (1024, CFG.d)
    cfg, truth, name = toy.read_toy(toy_files / "dictionary.h5")
    assert cfg == CFG and name == "toy1"
    # the written tokens are the generator's: same seed, same first rows
    x = toy.sample_acts(truth, cfg, 16, torch.Generator().manual_seed(cfg.seed + 1))
    with h5py.File(toy_files / "acts.h5") as h5:
        acts = h5["acts"]
        assert isinstance(acts, h5py.Dataset)
        assert torch.equal(torch.from_numpy(acts[:16]), x)


def test_recovery_stats_on_the_truth_itself():
    truth = toy.make_truth(CFG)
    x = toy.sample_acts(truth, CFG, 512, torch.Generator().manual_seed(5))
    codes = toy.sample_codes(truth, CFG, 4, torch.Generator().manual_seed(5))
    perfect = toy.recovery_stats(truth.dictionary, truth.dictionary.flip(0), x, x[:, :1], x)
    assert perfect.mmcs == pytest.approx(1.0) and perfect.recovered == 1.0 and perfect.fvu == 0.0
    rand = torch.randn(64, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert toy.max_cosines(truth.dictionary, rand).mean() < 0.7  # random dictionaries are far off
    assert codes.shape == (4, 64)


SAE_LENS_ARCHS: dict[str, dict[str, Any]] = {
    "standard": {"l1_coefficient": 1.0},
    "gated": {"l1_coefficient": 1.0},
    "jumprelu": {"l0_coefficient": 0.2},
    "batchtopk": {"k": 3.0},
}


def _train(arch: str, files, tmp_path) -> str:
    out = tmp_path / "saes" / arch
    if arch == "topk":
        cfg = TopKTrainConfig(d_in=32, d_sae=96, k=3, total_tokens=200_000, batch_size=512,
                              lr=3e-3, lr_warmup_steps=5, dead_tokens_threshold=5000)
        train_topk(files / "acts.h5", out, cfg, tmp_path / "ck", progress=False)
    elif arch == "saex":  # ReLU + L1 with saex's defaults (scale s, beta1 0, update projection)
        cfg = SaexTrainConfig(d_in=32, d_sae=96, total_tokens=400_000, batch_size=512,
                              sparsity_coefficient=0.35, lr=3e-3, lr_warmup_steps=5)
        train_saex(files / "acts.h5", out, cfg, tmp_path / "ck", progress=False)
    else:
        cfg = SAELensTrainConfig(architecture=arch, d_in=32, d_sae=96, batch_size=512,
                                 total_tokens=400_000 if arch == "batchtopk" else 200_000,
                                 lr=3e-3, dead_feature_window=20, **SAE_LENS_ARCHS[arch])
        train_sae_lens(files / "acts.h5", out, cfg, tmp_path / "ck", progress=False)
    return str(out)


@pytest.mark.parametrize("arch", ["topk", "saex", *SAE_LENS_ARCHS])
def test_every_architecture_recovers_the_dictionary(arch, toy_files, tmp_path):
    """MMCS >= 0.9 at (about) the true L0 of ~3 active features per token."""
    cfg, truth, _ = toy.read_toy(toy_files / "dictionary.h5")
    score = toy.evaluate_sae(_train(arch, toy_files, tmp_path), cfg, truth, 4096)
    assert score.mmcs >= 0.9, score
    assert 2.0 <= score.l0 <= 6.0, score  # the right L0: true L0 is 3.0
