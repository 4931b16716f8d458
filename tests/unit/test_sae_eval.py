"""SAE evaluation: per-token files against direct computation; splicing against manual hooks."""

import h5py
import numpy as np
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from saeflow import h5io
from saeflow.metrics import fvu, next_token_ce
from saeflow.models import load_model, resolve_site
from saeflow.results import load_sae_info
from saeflow.sae_eval import downstream_loss, evaluate_reconstruction, sparsify

D, D_SAE, K, N = 16, 48, 4, 203


@pytest.fixture
def sae():
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=D_SAE, k=K))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


@pytest.fixture
def acts_file(tmp_path):
    x = torch.randn(N, D).numpy() * 2 + 1
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as h5:
        h5["acts"] = x.astype(np.float32)
        h5["tokens"] = np.arange(N, dtype=np.int32)
        h5io.mark_complete(h5)
    return path, torch.from_numpy(x.astype(np.float32))


def test_sparsify_round_trips():
    dense = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    sparse = sparsify(dense)
    assert sparse.counts.tolist() == [1, 0, 2]
    assert sparse.idx.tolist() == [1, 0, 2] and sparse.val.tolist() == [2.0, 1.0, 3.0]


def test_evaluation_file_matches_direct_computation(sae, acts_file, tmp_path):
    path, x = acts_file
    out = tmp_path / "eval.h5"
    metrics = evaluate_reconstruction(sae, str(path), str(out), chunk=50, attrs={"sae_id": "t"})
    with torch.no_grad():
        latents, recon = sae.encode(x), sae(x)
    with load_sae_info(out) as info:
        torch.testing.assert_close(torch.from_numpy(info.error[:]), recon - x)
        torch.testing.assert_close(info.latents(slice(0, N)), latents)
        torch.testing.assert_close(info.latents(slice(60, 130)), latents[60:130])
        ids, _vals = info.active(101)
        assert sorted(ids.tolist()) == latents[101].nonzero().squeeze(-1).tolist()
        np.testing.assert_array_equal(info.l0[:], (latents != 0).sum(-1).numpy())
        np.testing.assert_allclose(info.error_sq_norm[:], (recon - x).pow(2).sum(-1).numpy(),
                                   rtol=1e-5)
        freq = (latents != 0).double().mean(0).numpy()
        np.testing.assert_allclose(info.latent_freq[:], freq)
        assert info.attrs["d_sae"] == D_SAE
    assert metrics["fvu"] == pytest.approx(fvu(x, recon), rel=1e-9)
    assert metrics["mean_l0"] == pytest.approx(K)  # random weights: all top-k pre-acts positive
    assert metrics["dead_fraction"] == pytest.approx(float((freq == 0).mean()))


def test_wrong_width_activations_file_is_rejected(sae, tmp_path):
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as h5:
        h5["acts"] = np.zeros((10, D + 1), dtype=np.float32)
        h5io.mark_complete(h5)
    with pytest.raises(h5io.InputFileError, match=r"acts\.h5: dataset 'acts' has shape \(10, 17\), expected \(\*, 16\)"):
        evaluate_reconstruction(sae, str(path), str(tmp_path / "e.h5"), 8, {})
    assert not (tmp_path / "e.h5").exists()


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_splicing_the_identity_recovers_clean_loss_and_zeros_match_a_hook(packaged_model_dir):
    model, _ = load_model(str(packaged_model_dir))
    site, skip = "blocks.2.hook_resid_post", 1
    tokens = np.random.default_rng(0).integers(2, 49152, size=(3, 10)).astype(np.int32)
    tokens[:, 0] = 1
    result = downstream_loss(_Identity(), model, site, tokens, skip, batch_size=2)
    assert result["ce_sae"] == pytest.approx(result["ce_clean"], rel=1e-6)
    assert result["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert result["downstream_tokens"] == 3 * (10 - 1 - skip)

    module, _ = resolve_site(model, site)

    def zero_after_skip(_m, _i, out):
        out[:, skip:] = 0
        return out

    handle = module.register_forward_hook(zero_after_skip)
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        ce_zero = next_token_ce(model(ids).logits, ids)[:, skip:].mean().item()
    handle.remove()
    assert result["ce_ablated"] == pytest.approx(ce_zero, rel=1e-6)
    assert result["ce_ablated"] > result["ce_clean"] + 1.0


def test_csr_is_left_out_above_csr_max_l0_and_everything_else_is_unchanged(sae, acts_file,
                                                                          tmp_path):
    path, _x = acts_file
    full, light = tmp_path / "full.h5", tmp_path / "light.h5"
    kept = evaluate_reconstruction(sae, str(path), str(full), chunk=50, attrs={}, csr_max_l0=K)
    dropped = evaluate_reconstruction(sae, str(path), str(light), chunk=50, attrs={},
                                      csr_max_l0=K - 0.5)  # L0 is exactly K: above the limit
    assert kept == dropped  # the metrics do not depend on what is stored
    with load_sae_info(full) as a, load_sae_info(light) as b:
        assert a.attrs["latents_stored"] and not b.attrs["latents_stored"]
        assert "latent_idx" in a.h5 and "latent_idx" not in b.h5
        for name in ("error", "error_sq_norm", "l0", "act_norm", "tokens", "latent_freq",
                     "latent_mean_act"):
            np.testing.assert_array_equal(a.h5[name][()], b.h5[name][()])  # pyright: ignore[reportIndexIssue]
        with pytest.raises(KeyError, match=r"no CSR latents stored \(mean L0 4\.0 .* csr_max_l0"):
            b.latents(slice(0, 5))
    assert light.stat().st_size < full.stat().st_size
