"""MLSAE training on activations computed on the fly (saeflow.mlsae.stream): every row is the
model's residual stream at the same token for every layer, each epoch visits every token once,
a resumed stream and a resumed training run equal uninterrupted ones, and the DAG drops the
training cache when the config asks for on_the_fly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from saeflow.mlsae.stream import ModelLayerBatches
from saeflow.mlsae.trainer import MLSAETrainConfig, train_mlsae

REPO = Path(__file__).resolve().parents[2]
LAYERS = [0, 2]
N_SEQ, CTX, SKIP = 6, 9, 1


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 64, size=(N_SEQ, CTX))


def _reference(model: LlamaForCausalLM, tokens: np.ndarray) -> torch.Tensor:
    """[L, n_seq * (ctx - skip), d]: each decoder layer's output, read with plain forward hooks."""
    outputs: dict[int, torch.Tensor] = {}

    def saver(layer: int):
        def save(_module: Any, _inputs: Any, out: Any) -> None:
            outputs[layer] = out[0] if isinstance(out, tuple) else out
        return save

    hooks = [model.model.layers[layer].register_forward_hook(saver(layer)) for layer in LAYERS]
    with torch.no_grad():
        model(torch.from_numpy(tokens))
    for hook in hooks:
        hook.remove()
    return torch.stack([outputs[layer][:, SKIP:].reshape(-1, 16) for layer in LAYERS])


def test_each_epoch_is_every_token_once_with_its_layers_together(tiny_lm, tokens) -> None:
    ref = _reference(tiny_lm, tokens)
    per_epoch = N_SEQ * (CTX - SKIP)  # 48 rows; batches of 5 cross pass and epoch boundaries
    stream = ModelLayerBatches(tiny_lm, tokens, LAYERS, batch_size=5, seed=3, seqs_per_pass=4,
                               skip=SKIP)
    rows = torch.cat([next(stream) for _ in range(2 * per_epoch // 5 + 1)], dim=1)
    assert rows.shape == (2, 100, 16)
    # which reference token each layer-0 row is, then the same token at layer 2
    dist = torch.cdist(rows[0], ref[0])
    index = dist.argmin(dim=1)
    assert float(dist.min(dim=1).values.max()) < 1e-4
    torch.testing.assert_close(rows[1], ref[1][index], atol=1e-4, rtol=1e-4)
    for epoch in range(2):
        seen = index[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert sorted(seen.tolist()) == list(range(per_epoch)), epoch
    assert not torch.equal(index[:per_epoch], index[per_epoch : 2 * per_epoch])  # reshuffled
    assert not torch.equal(index[:per_epoch], torch.arange(per_epoch))  # shuffled at all


def test_a_resumed_stream_continues_exactly(tiny_lm, tokens) -> None:
    def stream() -> ModelLayerBatches:
        return ModelLayerBatches(tiny_lm, tokens, LAYERS, batch_size=7, seed=1, seqs_per_pass=2,
                                 skip=SKIP)

    whole = stream()
    batches = [next(whole) for _ in range(12)]
    first = stream()
    for _ in range(5):
        next(first)
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    for expected in batches[5:]:
        assert torch.equal(next(resumed), expected)


def test_bad_stream_settings_are_named(tiny_lm, tokens) -> None:
    with pytest.raises(ValueError, match="skip_positions=9"):
        ModelLayerBatches(tiny_lm, tokens, LAYERS, 4, 0, 2, skip=9)
    with pytest.raises(ValueError, match="seqs_per_pass=0"):
        ModelLayerBatches(tiny_lm, tokens, LAYERS, 4, 0, 0, skip=1)


def test_training_on_the_fly_resumes_bitwise(tiny_lm, tokens, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = MLSAETrainConfig(d_in=16, d_sae=32, k=3, layers=LAYERS, total_tokens=12 * 16,
                           batch_size=16, lr=3e-3, dead_tokens_threshold=64, k_aux=4,
                           checkpoint_every_steps=5, log_every_steps=2)

    def stream() -> ModelLayerBatches:
        return ModelLayerBatches(tiny_lm, tokens, LAYERS, cfg.batch_size, cfg.seed,
                                 seqs_per_pass=3, skip=SKIP)

    whole = train_mlsae(stream(), tmp_path / "whole", cfg, tmp_path / "ck_w", progress=False)
    part = train_mlsae(stream(), tmp_path / "split", cfg, tmp_path / "ck_s", progress=False,
                       stop_after_steps=5)
    assert part["steps"] == 5
    train_mlsae(stream(), tmp_path / "split", cfg, tmp_path / "ck_s", progress=False)
    assert whole["steps"] == 12
    a = load_file(tmp_path / "whole" / "sae_weights.safetensors")
    b = load_file(tmp_path / "split" / "sae_weights.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_on_the_fly_config_trains_from_the_model_without_a_training_cache(tmp_path: Path) -> None:
    overlay = tmp_path / "on_the_fly.yaml"
    overlay.write_text(yaml.safe_dump({"mlsae": {"train_activations": "on_the_fly",
                                                 "seqs_per_pass": 8}}))
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--configfile",
           str(REPO / "config/test.yaml"), str(overlay), "--config",
           f"workdir={tmp_path / 'wd'}", "--cores", "1", "--", "mlsae/saes/mlsae-x1-k8/cfg.json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    shell = next(line for line in out.splitlines() if "saeflow.mlsae.train" in line)
    assert "--model resources/models/smollm2 --tokens-file data/tokens/news.h5" in shell, shell
    assert "--seqs-per-pass 8" in shell and "--acts" not in shell, shell
    assert "cache_mlsae_activations" not in out  # the cached path would need both corpora
