"""Activation caching on the real packaged model: values, layout, early stop, atomic outputs."""

import h5py
import numpy as np
import pytest
import torch

from saeflow import activations
from saeflow.activations import cache_activations, cache_loss, execution_order
from saeflow.data import write_tokens
from saeflow.h5io import H5File, InputFileError, open_checked
from saeflow.models import load_model, resolve_site, site_activation

N_SEQ, CTX, SKIP = 5, 12, 1
SITES = ["blocks.3.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"]


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 49152, size=(N_SEQ, CTX)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    path = tmp_path_factory.mktemp("tokens") / "tokens.h5"
    write_tokens(path, tokens, {"corpus": "random"})
    return path, tokens


def _reference(model, tokens, site):
    """The site's activation from a plain forward hook on the full model."""
    captured = {}
    module, _ = resolve_site(model, site)
    handle = module.register_forward_hook(lambda _m, _i, out: captured.update(a=site_activation(out)))
    with torch.no_grad():
        model(torch.from_numpy(tokens.astype(np.int64)))
    handle.remove()
    return captured["a"][:, SKIP:].reshape(-1, captured["a"].shape[-1])


def test_cached_activations_equal_a_plain_forward(packaged_model_dir, tokens_file, tmp_path):
    path, tokens = tokens_file
    outputs = {site: str(tmp_path / f"{site}.h5") for site in SITES}
    cache_activations(str(packaged_model_dir), str(path), outputs, batch_size=2,
                      skip_positions=SKIP, chunk_tokens=7, attrs={"model": "smollm2"})
    model, _ = load_model(str(packaged_model_dir))
    n = N_SEQ * (CTX - SKIP)
    for site in SITES:
        with open_checked(outputs[site], {"acts": (n, 576), "tokens": (n,)},
                          {"site": site, "skip_positions": SKIP, "ctx_len": CTX}) as h5:
            np.testing.assert_allclose(h5["acts"][:], _reference(model, tokens, site).numpy(),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(h5["tokens"][:], tokens[:, SKIP:].reshape(-1))


def test_sites_are_visited_in_execution_order():
    assert execution_order(SITES) == [
        "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.3.hook_resid_post"]


def test_forward_stops_after_the_last_needed_layer(packaged_model_dir, tokens_file, tmp_path):
    model, _ = load_model(str(packaged_model_dir))
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_a, i=i: ran.append(i))
    model.lm_head.register_forward_pre_hook(lambda *_a: ran.append("lm_head"))
    from nnsight import NNsight

    ids = torch.from_numpy(tokens_file[1][:2].astype(np.int64))
    activations.capture_batch(NNsight(model), model, ids, ["blocks.3.hook_resid_post"])
    assert ran == [0, 1, 2, 3]


def test_interrupted_caching_leaves_no_output(packaged_model_dir, tokens_file, tmp_path,
                                              monkeypatch):
    calls = {"n": 0}
    real = activations.capture_batch

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "capture_batch", failing)
    out = tmp_path / "acts.h5"
    with pytest.raises(KeyboardInterrupt):
        cache_activations(str(packaged_model_dir), str(tokens_file[0]), {SITES[0]: str(out)},
                          batch_size=2, skip_positions=SKIP, chunk_tokens=8, attrs={})
    assert list(tmp_path.iterdir()) == []


def test_per_token_loss_matches_the_model_loss(packaged_model_dir, tokens_file, tmp_path):
    path, tokens = tokens_file
    out = tmp_path / "loss.h5"
    cache_loss(str(packaged_model_dir), str(path), str(out), batch_size=3, attrs={})
    model, _ = load_model(str(packaged_model_dir))
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        mean_loss = model(ids, labels=ids).loss.item()
    with H5File(out) as h5:
        assert h5["loss"].shape == (N_SEQ, CTX - 1)
        assert h5["loss"][:].mean() == pytest.approx(mean_loss, rel=1e-5)


def test_bad_tokens_file_is_named(tmp_path, packaged_model_dir):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as h5:
        h5["tokens"] = np.zeros(10, dtype=np.int32)
        h5.attrs["complete"] = 1
    with pytest.raises(InputFileError, match=r"bad\.h5: dataset 'tokens' has shape \(10,\)"):
        cache_activations(str(packaged_model_dir), str(bad), {SITES[0]: str(tmp_path / "o.h5")},
                          batch_size=2, skip_positions=SKIP, chunk_tokens=8, attrs={})
    assert not (tmp_path / "o.h5").exists()
