"""Max-activating examples per (latent, layer): against a dense brute-force reference, and their
round trip through both feature-database back-ends (replace per SAE)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pg_server import scratch_server, store_url

from saeflow.analysis import store
from saeflow.h5io import mark_complete
from saeflow.mlsae.examples import TopPerGroup, example_rows, find_examples
from saeflow.mlsae.math import dense_codes, encode, standardise
from saeflow.mlsae.trainer import LoadedMLSAE
from saeflow.topk import TopKParams

pytestmark = pytest.mark.usefixtures("one_thread")
N_SEQ, SEQ_LEN, D, M, K = 6, 9, 8, 12, 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("examples")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, N_SEQ * SEQ_LEN, D, generator=gen)
    tokens = torch.randint(0, 50, (N_SEQ * SEQ_LEN,), generator=gen).numpy().astype(np.int32)
    paths = []
    for layer in range(3):
        path = root / f"l{layer}.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("acts", data=x[layer].numpy(), chunks=(10, D))
            h5.create_dataset("tokens", data=tokens)
            h5.attrs.update({"ctx_len": SEQ_LEN + 1, "skip_positions": 1})
            mark_complete(h5)
        paths.append(str(path))
    w = torch.randn(M, D, generator=gen)
    sae = LoadedMLSAE(TopKParams(w.T.contiguous(), torch.zeros(M), w, torch.zeros(D)), K,
                      [4, 5, 6], True)
    return {"x": x, "tokens": tokens, "paths": paths, "sae": sae}


def test_top_per_group_keeps_the_best_n_with_ties_to_the_earlier_row() -> None:
    top = TopPerGroup(2)
    top.update(np.array([5, 5, 5, 1]), np.array([1.0, 3.0, 2.0, 0.5]), np.array([0, 1, 2, 3]))
    top.update(np.array([5, 1, 1]), np.array([3.0, 0.5, 0.7]), np.array([0, 9, 8]))
    ex = top.result(4)
    got = list(zip(ex.layer * 4 + ex.latent, ex.row, ex.act, ex.rank, strict=True))
    assert got == [(1, 8, np.float32(0.7), 0), (1, 3, np.float32(0.5), 1),
                   (5, 0, np.float32(3.0), 0), (5, 1, np.float32(3.0), 1)]


def test_examples_match_the_dense_reference(toy: dict) -> None:
    sae, x = toy["sae"], toy["x"]
    files = [h5py.File(p, "r") for p in toy["paths"]]
    try:
        acts: list[h5py.Dataset] = [f["acts"] for f in files]  # type: ignore[misc]
        ex, windows, wacts = find_examples(sae, acts, 3, 2, SEQ_LEN, chunk=7)
    finally:
        for f in files:
            f.close()
    dense = dense_codes(encode(sae.params, standardise(x).x, K), M).numpy()  # (L, T, M)
    seen = set()
    for layer in range(3):
        for latent in range(M):
            col = dense[layer, :, latent]
            fired = np.flatnonzero(col > 0)
            best = sorted(fired, key=lambda r: (-col[r], r))[:3]
            mine = (ex.layer == layer) & (ex.latent == latent)
            assert list(ex.row[mine]) == best, (layer, latent)
            np.testing.assert_allclose(ex.act[mine], col[best], rtol=1e-6)
            assert list(ex.rank[mine]) == list(range(len(best)))
            if best:
                seen.add((layer, latent))
    assert len(seen) > 10
    for e in range(len(ex.row)):
        seq = ex.row[e] // SEQ_LEN
        for w, r in zip(windows[e], ex.row[e] + np.arange(-2, 3), strict=True):
            inside = 0 <= r < N_SEQ * SEQ_LEN and r // SEQ_LEN == seq
            assert w == (r if inside else -1)
        valid = windows[e] >= 0
        np.testing.assert_allclose(wacts[e][valid],
                                   dense[ex.layer[e], windows[e][valid], ex.latent[e]], rtol=1e-6)
        assert wacts[e][2] == pytest.approx(ex.act[e])  # the centre is the example itself
    rows = example_rows(ex, windows, wacts, toy["tokens"], [4, 5, 6], lambda i: f"<{i}>")
    assert {r["layer"] for r in rows} == {4, 5, 6}  # model layer numbers
    first = rows[0]
    assert first["token"] == f"<{first['token_id']}>" and len(first["tokens"]) == len(
        first["acts"]) == len(first["token_ids"])


@pytest.fixture(scope="module")
def pg_url():
    with scratch_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    return store_url(request, tmp_path, ("layer_examples", "mlsaes"))


def _row(idx: int, layer: int, rank: int, act: float) -> dict:
    return {"idx": idx, "layer": layer, "rank": rank, "act": act, "token_id": 7, "token": " é",
            "token_ids": [3, 7], "tokens": ["a", " é"], "acts": [0.0, act]}


def test_layer_examples_round_trip_and_replace(db) -> None:
    s = store.open_store(db)
    try:
        rows = [_row(1, 2, 1, 0.5), _row(1, 0, 0, 2.0), _row(1, 2, 0, 0.9), _row(3, 0, 0, 1.0)]
        assert s.load_layer_examples("m", rows, {"sae_id": "m", "layers": [0, 2]}) == 4
        loaded = s.mlsae("m")
        assert loaded is not None and loaded["summary"]["layers"] == [0, 2]
        assert s.mlsae("nope") is None
        assert s.load_layer_examples("other", [_row(1, 2, 0, 9.0)]) == 1
        got = s.layer_examples("m", 1)
        assert [(r["layer"], r["rank"], r["act"]) for r in got] == [(0, 0, 2.0), (2, 0, 0.9),
                                                                   (2, 1, 0.5)]
        assert got[0]["tokens"] == ["a", " é"] and got[0]["acts"] == [0.0, 2.0]
        assert [r["act"] for r in s.layer_examples("m", 1, layer=2)] == [0.9, 0.5]
        assert s.load_layer_examples("m", [_row(1, 5, 0, 4.0)], {"layers": [5]}) == 1
        assert [m["summary"]["layers"] for m in s.mlsaes()] == [[5]]  # replaced, m only
        assert [r["layer"] for r in s.layer_examples("m", 1)] == [5]
        assert s.layer_examples("m", 3) == []
        assert s.layer_examples("other", 1)[0]["act"] == 9.0
    finally:
        s.close()


def test_example_mlsaes_must_be_mlsaes_of_the_section() -> None:
    import yaml

    from saeflow.mlsae.config import MLSAEConfigError, example_mlsaes

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config/test.yaml")
                            .read_text())
    assert example_mlsaes(config) == ["mlsae-x1-k8"]
    config["mlsae"]["example_mlsaes"] = ["sae-x1-k8-layer2"]
    with pytest.raises(MLSAEConfigError, match="mlsae.example_mlsaes: 'sae-x1-k8-layer2'"):
        example_mlsaes(config)
