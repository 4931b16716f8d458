"""saeflow.mlsae.similarity against float64 brute-force references: MMCS of every ordered pair,
streamed adjacent-layer residual cosine similarities, embedding similarities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_mlsae_train import write_layers

from saeflow.mlsae.math import adjacent_cosine
from saeflow.mlsae.similarity import embed_cos_sim, mmcs_table, resid_cos_sim

pytestmark = pytest.mark.usefixtures("one_thread")


def _cos64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a @ b.T) / a.norm(dim=1, keepdim=True) / b.norm(dim=1)


def test_mmcs_table_of_every_ordered_pair() -> None:
    gen = torch.Generator().manual_seed(0)
    decoders = {"a": torch.randn(40, 12, generator=gen), "b": torch.randn(25, 12, generator=gen)}
    decoders["c"] = decoders["a"][:30] + 1e-3 * torch.randn(30, 12, generator=gen)
    table = mmcs_table(decoders, chunk=7).set_index(["sae_a", "sae_b"])
    assert len(table) == 9
    for a, wa in decoders.items():
        for b, wb in decoders.items():
            cos = _cos64(wa, wb)
            if a == b:
                cos.fill_diagonal_(-2.0)
            best = cos.max(dim=1).values
            row = table.loc[(a, b)]
            assert row["mean"] == pytest.approx(float(best.mean()), abs=1e-6)
            assert row["std"] == pytest.approx(float(best.std()), abs=1e-5)
            assert row["sem"] == pytest.approx(float(best.std()) / len(best) ** 0.5, abs=1e-6)
            assert (row["n_latents_a"], row["n_latents_b"]) == (len(wa), len(wb))
    assert table.loc[("c", "a"), "mean"] > 0.999  # c's rows are perturbed copies of a's
    assert table.loc[("a", "c"), "mean"] < table.loc[("c", "a"), "mean"]  # a has 10 more


def test_resid_cos_sim_streams_the_float64_reference(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 333, 8, generator=gen) + 3.0
    x = base + 0.7 * torch.randn(4, 333, 8, generator=gen)  # related layers, nonzero mean
    paths = write_layers(tmp_path, x, chunk=100)
    table = resid_cos_sim(paths, [3, 4, 5, 6], chunk=50)
    ref = adjacent_cosine(x.double())
    assert list(table["layer"]) == [3, 4, 5, 6] and list(table["next_layer"]) == [4, 5, 6, -1]
    torch.testing.assert_close(torch.tensor(table["cos_sim_mean"].to_numpy()[:3]), ref,
                               atol=1e-6, rtol=0)
    x64 = x.double()
    xc = x64 - x64.mean(1, keepdim=True)
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(xc[i], xc[i + 1], dim=-1)
        assert table["cos_sim_std"].to_numpy()[i] == pytest.approx(float(cos.std()), rel=1e-5)
        raw = torch.nn.functional.cosine_similarity(x64[i], x64[i + 1], dim=-1)
        assert table["cos_sim_raw_mean"].to_numpy()[i] == pytest.approx(float(raw.mean()), abs=1e-6)
    norms = x64.norm(dim=-1).mean(1)
    torch.testing.assert_close(torch.tensor(table["l2_norm_mean"].to_numpy()), norms,
                               atol=1e-4, rtol=0)
    # centring matters here: the raw residuals share a large mean
    assert (table["cos_sim_raw_mean"].to_numpy()[:3] > table["cos_sim_mean"].to_numpy()[:3]).all()


def test_embed_cos_sim_finds_the_planted_tokens() -> None:
    gen = torch.Generator().manual_seed(2)
    embed_in, embed_out = torch.randn(50, 16, generator=gen), torch.randn(50, 16, generator=gen)
    w = torch.randn(6, 16, generator=gen)
    w[0] = 3 * embed_in[17]  # latent 0 is token 17's embedding, latent 1 token 9's unembedding
    w[1] = embed_out[9] + 1e-4 * torch.randn(16, generator=gen)
    summary, latents = embed_cos_sim({"s": w}, embed_in, embed_out, chunk=4)
    assert (latents.loc[0, "in_token_id"], latents.loc[1, "out_token_id"]) == (17, 9)
    assert latents.loc[0, "in_cos_sim"] == pytest.approx(1.0, abs=1e-6)
    best_in = _cos64(w, embed_in).max(dim=1).values
    best_out = _cos64(w, embed_out).max(dim=1).values
    torch.testing.assert_close(torch.tensor(latents["in_cos_sim"].to_numpy()).double(), best_in,
                               atol=1e-6, rtol=0)
    assert summary.loc[0, "out_mean"] == pytest.approx(float(best_out.mean()), abs=1e-6)
    assert summary.loc[0, "n_latents"] == 6
