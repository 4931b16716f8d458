"""The multi-token regime: all-position activations equal an unbatched forward pass (padding
zero), SAE pooling in row batches equals pooling the dense latents, the probes of one dataset
(the attention probe beats the last-token probe on a signal before the last position) and the
figure's table."""

import numpy as np
import pandas as pd
import pytest
import torch
from nnsight import NNsight
from sae_lens import SAE, StandardSAEConfig
from sklearn.decomposition import PCA

from saeflow.models import load_model
from saeflow.probing import acts, attention, multi_token
from saeflow.probing.attention import pool

pytestmark = pytest.mark.usefixtures("one_thread")
SITE = "blocks.2.hook_resid_post"


def test_all_positions_equal_an_unbatched_forward(packaged_model_dir, tmp_path):
    model, tok = load_model(str(packaged_model_dir))
    prompts = ["The cat sat.", "A much longer prompt about the history of Rome and its emperors.",
               "Hello", "def f(x): return x"]
    seqs = acts.tokenize(tok, prompts, 64)
    path = str(tmp_path / "m.h5")
    with torch.inference_mode():
        # batch_tokens 20: several batches, rows written out of order
        multi_token.write_all_positions(path, NNsight(model), model, seqs, SITE, 20, 0,
                                        np.array([0, 1, 0, 1]), {"dataset": "m"})
        x, lengths, y = multi_token.read_all_positions(path, SITE)
        assert x.shape == (4, max(map(len, seqs)), 576) and lengths.tolist() == list(map(len, seqs))
        for i, seq in enumerate(seqs):
            ref = model(torch.tensor([seq]), output_hidden_states=True).hidden_states[3][0]
            np.testing.assert_allclose(x[i, : len(seq)], ref.numpy(), rtol=1e-4, atol=1e-4)
            assert not x[i, len(seq):].any()  # padding stays zero
    assert y.tolist() == [0, 1, 0, 1]


def _sae(d_in: int, d_sae: int) -> SAE:
    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=d_in, d_sae=d_sae).to_dict())
    with torch.no_grad():
        sae.W_enc.data = torch.randn(d_in, d_sae)
        sae.b_enc.data = torch.full((d_sae,), -0.5)
    return sae


def test_sae_pooling_in_row_batches_equals_the_dense_pool():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(9, 6, 8)).astype(np.float32)
    lengths = np.array([6, 1, 3, 5, 2, 6, 4, 1, 3])
    sae = _sae(8, 32)
    mean, mx = multi_token.sae_pooled(sae, x, lengths, batch_rows=4)
    z = sae.encode(torch.from_numpy(x.reshape(-1, 8))).detach().numpy().reshape(9, 6, 32)
    np.testing.assert_allclose(mean, pool(z, lengths, "mean"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mx, pool(z, lengths, "max"), rtol=1e-5, atol=1e-6)
    assert mx[1].tolist() == z[1, 0].tolist()  # a one-token row pools its only position


def _task(n: int, seed: int, width: int = 12, d: int = 8):
    """Position 0 is a loud constant (as a first token); one later position before the last
    holds a marker (dim 0 = 3) and the label (dim 1 = +-2); the rest is noise."""
    rng = np.random.RandomState(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    lengths = rng.randint(5, width + 1, n)
    x = rng.normal(scale=0.5, size=(n, width, d)).astype(np.float32)
    x[:, 0] = 30.0
    where = rng.randint(1, lengths - 1)
    x[np.arange(n), where, 0] = 3.0
    x[np.arange(n), where, 1] = np.where(y == 1, 2.0, -2.0)
    x[np.arange(width)[None, :] >= lengths[:, None]] = 0.0
    return x, lengths, y


def test_probes_of_one_dataset():
    x, lengths, y = _task(500, seed=0)
    rows = multi_token.probe_dataset("d", x, lengths, y, 2, [("s", _sae(8, 16))], k=128,
                                     epochs=300, lr=0.03, seed=0)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["last_token", "mean_pool", "concat", "attn_probe", "sae_mean", "sae_max"]
    assert by["concat"]["test_auc"] > 0.9  # the class is at one position: its PCA has it
    assert by["last_token"]["test_auc"] < 0.7
    assert by["attn_probe"]["test_auc"] > 0.95 > by["last_token"]["test_auc"] + 0.25
    assert by["sae_mean"]["k"] == 16 and by["sae_mean"]["sae_id"] == "s"
    assert rows == multi_token.probe_dataset("d", x, lengths, y, 2, [("s", _sae(8, 16))],
                                             k=128, epochs=300, lr=0.03, seed=0)  # seeded


def test_figure_table_takes_the_sae_of_best_validation_auc_and_a_mean_row():
    results = pd.DataFrame({
        "dataset": ["a", "a", "a", "b", "b"],
        "method": ["last_token", "sae_mean", "sae_mean", "last_token", "sae_mean"],
        "sae_id": ["", "s1", "s2", "", "s1"], "k": [0, 128, 128, 0, 128],
        "test_auc": [0.6, 0.7, 0.9, 0.8, 0.5], "val_auc": [0.6, 0.8, 0.7, 0.8, 0.6],
        "layer": 2})
    table = multi_token.figure_table(results).set_index(["dataset", "method"])
    assert table.loc[("a", "sae_mean"), "sae_id"] == "s1"  # validation 0.8 > 0.7
    assert table.loc[("mean", "sae_mean"), "test_auc"] == pytest.approx((0.7 + 0.5) / 2)
    assert table.loc[("mean", "last_token"), "test_auc"] == pytest.approx(0.7)


def test_concat_pca_is_a_per_position_pca_fitted_on_the_training_rows():
    gen = np.random.default_rng(0)
    x_tr, x_te = gen.normal(size=(60, 4, 30)), gen.normal(size=(25, 4, 30))
    f_tr, f_te = attention.concat_pca(x_tr, x_te, n_components=5)
    assert f_tr.shape == (60, 15) and f_te.shape == (25, 15)  # positions 1..3, 5 each
    for t in range(1, 4):
        pca = PCA(5, svd_solver="full").fit(x_tr[:, t])
        part = slice(5 * (t - 1), 5 * t)
        sign = np.sign((f_tr[:, part] * pca.transform(x_tr[:, t])).sum(0))  # PCA's sign is free
        np.testing.assert_allclose(f_tr[:, part] * sign, pca.transform(x_tr[:, t]), atol=1e-9)
        np.testing.assert_allclose(f_te[:, part] * sign, pca.transform(x_te[:, t]), atol=1e-9)

