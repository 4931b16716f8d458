"""saeflow.mlsae.trainer: recovery of a synthetic multi-layer dictionary with known layer
profiles, bitwise resume, and both on-disk layouts (SAELens and the original's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file
from torch import Tensor

from saeflow.h5io import mark_complete, write_attrs
from saeflow.mlsae.math import (
    layer_dists,
    reconstruct,
    standardise,
    summarise_dists,
)
from saeflow.mlsae.pretrained import main as import_main
from saeflow.mlsae.trainer import MLSAETrainConfig, load_mlsae, load_original, train_mlsae
from saeflow.saes import ImportSAEError

pytestmark = pytest.mark.usefixtures("one_thread")


def write_layers(root: Path, acts: Tensor, chunk: int = 512) -> list[str]:
    """One activations file per layer, as the caching stage writes them."""
    paths = []
    for layer in range(acts.shape[0]):
        path = root / f"blocks.{layer}.hook_resid_post.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("acts", data=acts[layer].numpy(), chunks=(chunk, acts.shape[2]))
            write_attrs(h5, {"model": "toy", "corpus": "toy", "site": f"blocks.{layer}"})
            mark_complete(h5)
        paths.append(str(path))
    return paths


def multilayer_toy(n_tokens: int, n_layers: int, n_features: int, d: int,
                   n_active: float, seed: int) -> dict[str, Tensor]:
    """Features shared across layers: feature j of a token contributes a_j * profile_j(l) * D_j
    at layer l, profile_j a Gaussian bump (width 0.8 layers) around a random centre, cut at 0.1.

    Returns the activations (L, n, d), the dictionary (F, d), the profiles (L, F) and the codes
    (L, n, F) the rows are made of.
    """
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=gen)
    D /= D.norm(dim=1, keepdim=True)
    centre = torch.rand(n_features, generator=gen) * (n_layers - 1)
    layers = torch.arange(n_layers).unsqueeze(1).float()
    profile = torch.exp(-((layers - centre) ** 2) / (2 * 0.8**2))
    profile = profile * (profile >= 0.1)
    on = torch.rand(n_tokens, n_features, generator=gen) < n_active / n_features
    mag = on * (0.5 + torch.rand(n_tokens, n_features, generator=gen))
    codes = mag.unsqueeze(0) * profile.unsqueeze(1)  # (L, n, F)
    return {"acts": codes @ D, "features": D, "profile": profile, "codes": codes}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mlsae_toy")
    toy = multilayer_toy(16384, 6, 48, 32, 5, seed=0)
    paths = write_layers(root, toy["acts"])
    cfg = MLSAETrainConfig(d_in=32, d_sae=96, k=6, layers=list(range(6)),
                           total_tokens=300_000, batch_size=512, lr=3e-3, lr_warmup_steps=20,
                           dead_tokens_threshold=20_000, k_aux=16, buffer_tokens=4096)
    stats = train_mlsae(paths, root / "sae", cfg, root / "ckpt", progress=False)
    return {"root": root, "toy": toy, "cfg": cfg, "stats": stats}


def test_dictionary_is_recovered(toy_run: dict[str, Any]) -> None:
    W_dec = load_mlsae(toy_run["root"] / "sae").params.W_dec
    max_cos = (toy_run["toy"]["features"] @ W_dec.T).max(dim=1).values
    assert max_cos.mean() >= 0.9, f"MMCS {float(max_cos.mean()):.3f}"


def test_layer_distributions_match_the_known_profiles(toy_run: dict[str, Any]) -> None:
    """Each true feature's layer distribution (its codes in standardised space, summed over
    tokens) against the distribution of the latent that matches it, measured on the data."""
    toy, sae = toy_run["toy"], load_mlsae(toy_run["root"] / "sae")
    x = toy["acts"]
    _, codes = reconstruct(sae.params, x, sae.k)
    _, totals = layer_dists(codes, x.shape[0], sae.params.W_dec.shape[0])
    learned = summarise_dists(totals)
    scale = standardise(x).scale  # (L, n, 1): true codes as the SAE sees them
    true = summarise_dists((toy["codes"].double() / scale.double()).sum(1))
    match = (toy["features"] @ sae.params.W_dec.T).argmax(dim=1)
    tv = 0.5 * (learned.probs[:, match] - true.probs).abs().sum(0)  # total variation
    assert float(tv.mean()) < 0.1, f"mean total variation {float(tv.mean()):.3f}"
    shift = (learned.layer_mean[match] - true.layer_mean).abs()
    assert float(shift.mean()) < 0.25, f"mean layer-mean shift {float(shift.mean()):.3f}"


def test_both_layouts_load_the_same_weights(toy_run: dict[str, Any]) -> None:
    root = toy_run["root"] / "sae"
    ours, theirs = load_mlsae(root), load_original(root / "original")
    for a, b in zip(ours.params, theirs.params):
        assert torch.equal(a, b)
    assert (theirs.k, theirs.layers, theirs.standardise) == (6, list(range(6)), True)
    decoder = load_file(root / "sae_weights.safetensors")["W_dec"]
    torch.testing.assert_close(decoder.norm(dim=1), torch.ones(96), atol=1e-5, rtol=0)


def test_sae_lens_encodes_as_the_mlsae(toy_run: dict[str, Any]) -> None:
    sae = SAE.load_from_disk(str(toy_run["root"] / "sae"))
    ours = load_mlsae(toy_run["root"] / "sae")
    x = toy_run["toy"]["acts"][2, :300] + 0.01 * torch.randn(300, 32)
    recon, codes = reconstruct(ours.params, x, ours.k)
    dense = torch.zeros(300, 96).scatter_(1, codes.indices, codes.values)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), dense, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sae(x), recon, atol=1e-4, rtol=1e-4)


def test_training_reached_a_low_fvu(toy_run: dict[str, Any]) -> None:
    assert toy_run["stats"]["fvu"] < 0.1
    assert toy_run["stats"]["steps"] == toy_run["cfg"].total_steps


def test_resume_gives_bitwise_identical_weights(tmp_path: Path) -> None:
    toy = multilayer_toy(3000, 3, 24, 16, 3, seed=1)
    paths = write_layers(tmp_path, toy["acts"], chunk=300)
    cfg = MLSAETrainConfig(d_in=16, d_sae=96, k=3, layers=[0, 1, 2], total_tokens=30 * 128,
                           batch_size=128, lr=3e-3, dead_tokens_threshold=256, k_aux=8,
                           checkpoint_every_steps=7, log_every_steps=3, buffer_tokens=900)
    whole = train_mlsae(paths, tmp_path / "whole", cfg, tmp_path / "ck_whole", progress=False)
    part = train_mlsae(paths, tmp_path / "split", cfg, tmp_path / "ck_split", progress=False,
                       stop_after_steps=14)
    assert part["steps"] == 14 and not (tmp_path / "split").exists()
    split = train_mlsae(paths, tmp_path / "split", cfg, tmp_path / "ck_split", progress=False)
    assert whole["auxk_loss"] > 0, "the run should exercise AuxK"
    for layout in ("sae_weights.safetensors", "original/model.safetensors"):
        a, b = load_file(tmp_path / "whole" / layout), load_file(tmp_path / "split" / layout)
        for name in a:
            assert torch.equal(a[name], b[name]), (layout, name)
    strip = [{k: v for k, v in s.items() if k != "tokens_per_s"} for s in (whole, split)]
    assert strip[0] == strip[1]


def test_layer_files_must_agree(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_layers(tmp_path / "a", torch.randn(1, 100, 8), chunk=50)
    b = write_layers(tmp_path / "b", torch.randn(1, 90, 8), chunk=50)
    cfg = MLSAETrainConfig(d_in=8, d_sae=16, k=2, layers=[0, 1], total_tokens=100,
                           batch_size=10)
    with pytest.raises(ValueError, match=r"acts is \[90, 8\], expected \[100, 8\]"):
        train_mlsae(a + b, tmp_path / "out", cfg, tmp_path / "ck", progress=False)


def test_original_layout_imports_into_both_layouts(toy_run: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """The pretrained path: a folder as the original's save_pretrained writes it (here saved by
    saeflow, then stripped to the original's two files) converts to identical weights."""
    src = tmp_path / "hub_copy"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        (src / name).write_bytes((toy_run["root"] / "sae" / "original" / name).read_bytes())
    import_main(["--path", str(src), "--out", str(tmp_path / "imported")])
    a, b = load_mlsae(toy_run["root"] / "sae"), load_mlsae(tmp_path / "imported")
    for x, y in zip(a.params, b.params):
        assert torch.equal(x, y)
    assert (b.k, b.layers, b.standardise) == (a.k, a.layers, a.standardise)
    assert SAE.load_from_disk(str(tmp_path / "imported")).cfg.d_sae == 96


def test_hub_import_refuses_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImportSAEError, match="tim-lawson/mlsae-pythia-70m-deduped-x64-k32"):
        import_main(["--repo", "tim-lawson/mlsae-pythia-70m-deduped-x64-k32",
                     "--out", str(tmp_path / "x")])
