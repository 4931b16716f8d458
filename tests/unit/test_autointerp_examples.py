"""Latent examples: planted activations with known top windows, deciles, zeros and alignment."""

import itertools
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from saeflow import error_saes, h5io, topk
from saeflow.autointerp import examples as ex
from saeflow.autointerp.h5data import dataset

N_SEQ, CTX, SKIP, WIN, D = 40, 26, 1, 8, 6  # 25 cached positions -> 3 windows of 8 per sequence


# Tiny shapes: OpenMP hand-offs cost more than they save (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def write_corpus(tmp: Path, x: np.ndarray) -> tuple[Path, Path]:
    """A tokens file [N_SEQ, CTX] and an activations file of its positions SKIP.. (x rows)."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 1000, (N_SEQ, CTX)).astype(np.int32)
    tok_path, acts_path = tmp / "tokens.h5", tmp / "acts.h5"
    with h5py.File(tok_path, "w") as h5:
        h5["tokens"] = tokens
        h5io.mark_complete(h5)
    with h5py.File(acts_path, "w") as h5:
        h5.create_dataset("acts", data=x.astype(np.float32), chunks=(100, x.shape[1]))
        h5["tokens"] = tokens[:, SKIP:].reshape(-1)
        h5io.write_attrs(h5, {"n_seq": N_SEQ, "ctx_len": CTX, "skip_positions": SKIP})
        h5io.mark_complete(h5)
    return acts_path, tok_path


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Latent j's activation is relu(x[:, j]); latent 5 never fires, latent 4 fires rarely."""
    tmp = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(0)
    n = N_SEQ * (CTX - SKIP)
    x = rng.normal(size=(n, D)) - 1.0  # each latent fires on ~16% of positions
    x[:, 5] = -1.0
    x[:, 4] = -1.0
    x[rng.choice(n, 3, replace=False), 4] = 2.0
    acts, toks = write_corpus(tmp, x)
    cfg = ex.ExampleConfig(n_latents=D, ctx_len=WIN, n_top=4, n_per_decile=2, n_random=6,
                           max_examples=1000, min_examples=10, seed=3)
    with h5io.open_checked(acts) as a, h5io.open_checked(toks) as t:
        arrays = ex.collect(a, t, lambda z: z.relu(), cfg, chunk=150)  # chunk: 6 sequences
    return {"x": x, "arrays": arrays, "cfg": cfg, "tokens": toks}


def window_values(x: np.ndarray) -> np.ndarray:
    """Per-window maxima by hand [n_windows, D]: windows of WIN within each sequence."""
    per_seq = (CTX - SKIP) // WIN
    seqs = np.maximum(x, 0).reshape(N_SEQ, CTX - SKIP, D)[:, : per_seq * WIN]
    return seqs.reshape(N_SEQ * per_seq, WIN, D).max(axis=1)


def test_rare_and_dead_latents_are_skipped(planted):
    arrays = planted["arrays"]
    assert sorted(arrays["skipped_latents"].tolist()) == [4, 5]
    assert sorted(arrays["latents"].tolist()) == [0, 1, 2, 3]
    assert arrays["n_windows"] == N_SEQ * 3
    wv = window_values(planted["x"])
    np.testing.assert_array_equal(arrays["n_activating"], (wv[:, arrays["latents"]] > 0).sum(0))


def test_top_examples_are_the_true_top_windows(planted):
    arrays, wv = planted["arrays"], window_values(planted["x"])
    for i, latent in enumerate(arrays["latents"]):
        top = arrays["window"][i][arrays["kind"][i] == ex.KIND_TOP]
        assert len(top) == 4
        true_top = np.sort(wv[:, latent])[::-1][:4]
        np.testing.assert_allclose(np.sort(wv[top, latent])[::-1], true_top, rtol=1e-6)


def test_deciles_are_ordered_and_disjoint_from_the_explainer(planted):
    arrays, wv = planted["arrays"], window_values(planted["x"])
    for i, latent in enumerate(arrays["latents"]):
        kind, dec, win = arrays["kind"][i], arrays["decile"][i], arrays["window"][i]
        assert set(dec[kind == ex.KIND_DECILE]) == set(range(1, 11))
        assert (dec[kind != ex.KIND_DECILE] == 0).all()
        values = [wv[win[(kind == ex.KIND_DECILE) & (dec == q)], latent] for q in range(1, 11)]
        assert all(v.size > 0 and (v > 0).all() for v in values)
        for low, high in itertools.pairwise(values):
            assert low.max() <= high.min()
        assert not set(win[kind == ex.KIND_TOP]) & set(win[kind == ex.KIND_DECILE])


def test_random_examples_do_not_activate(planted):
    arrays, wv = planted["arrays"], window_values(planted["x"])
    for i, latent in enumerate(arrays["latents"]):
        rand = arrays["kind"][i] == ex.KIND_RANDOM
        assert rand.sum() == 6
        assert (arrays["acts"][i][rand] == 0).all()
        assert (wv[arrays["window"][i][rand], latent] == 0).all()


def test_tokens_and_acts_are_aligned(planted):
    arrays, x = planted["arrays"], planted["x"]
    with h5py.File(planted["tokens"]) as h5:
        tokens = np.array(dataset(h5, "tokens"))
    per_seq = (CTX - SKIP) // WIN
    for i, latent in enumerate(arrays["latents"]):
        for e in np.flatnonzero(arrays["kind"][i] != ex.KIND_PAD):
            seq, j = divmod(int(arrays["window"][i, e]), per_seq)
            first = SKIP + j * WIN
            np.testing.assert_array_equal(arrays["tokens"][i, e], tokens[seq, first:first + WIN])
            rows = seq * (CTX - SKIP) + j * WIN + np.arange(WIN)
            np.testing.assert_allclose(arrays["acts"][i, e], np.maximum(x[rows, latent], 0),
                                       rtol=1e-6)
        # an explainer window peaks at its recorded maximum
        top = arrays["kind"][i] == ex.KIND_TOP
        assert (arrays["acts"][i][top].max(axis=1) > 0).all()


def test_choose_latents_walks_a_seeded_order():
    counts = np.array([0, 50, 50, 5, 50, 50])
    chosen, skipped = ex.choose_latents(counts, 2, 10, seed=0)
    order = np.random.default_rng(0).permutation(6)
    ok = [int(j) for j in order if counts[j] >= 10][:2]
    assert chosen.tolist() == ok
    stop = list(order).index(ok[-1])
    assert skipped.tolist() == [int(j) for j in order[:stop] if counts[j] < 10]


def test_cli_on_an_error_sae_writes_the_agreed_format(tmp_path):
    """Base SAE -> nonlinear component -> error SAE, through the CLI; acts re-encoded by hand."""
    g = torch.Generator().manual_seed(2)
    n = N_SEQ * (CTX - SKIP)
    x = torch.randn(n, D, generator=g) @ torch.randn(D, D, generator=g)
    acts, toks = write_corpus(tmp_path, x.numpy())
    w = torch.nn.functional.normalize(torch.randn(12, D, generator=g), dim=1)
    params = topk.TopKParams(w.T.contiguous(), torch.zeros(12), w, torch.zeros(D))
    base = topk.save_topk(tmp_path / "base", params, topk.TopKTrainConfig(D, 12, 2, 1))
    fit = tmp_path / "fit.h5"
    error_saes.fit_map(str(acts), str(base), str(fit), 300)
    w2 = torch.nn.functional.normalize(torch.randn(16, D, generator=g), dim=1)
    err_params = topk.TopKParams(w2.T.contiguous(), torch.zeros(16), w2, torch.zeros(D))
    source = error_saes.ErrorSAE(str(base), "base", "nonlinear", str(fit))
    error_saes.save_error_sae(tmp_path / "err", err_params, topk.TopKTrainConfig(D, 16, 3, 1),
                              {}, source)
    out = tmp_path / "examples.h5"
    args = ["--acts", str(acts), "--tokens", str(toks), "--sae", str(tmp_path / "err"),
            "--sae-id", "err", "--out", str(out), "--base-sae", str(base), "--fit", str(fit),
            "--n-latents", "3", "--ctx-len", str(WIN), "--n-top", "3", "--n-per-decile", "1",
            "--n-random", "2", "--min-examples", "5", "--chunk-tokens", "200"]
    with pytest.raises(h5io.InputFileError, match="nonlinear component"):
        ex.main([*args, "--component", "linear"])
    summary = ex.main([*args, "--component", "nonlinear"])
    with h5io.open_checked(out, {"latents": (3,), "tokens": (3, 15, WIN), "acts": (3, 15, WIN),
                                 "kind": (3, 15), "decile": (3, 15)}) as h5:
        assert h5.attrs["sae_id"] == "err" and h5.attrs["ctx_len"] == WIN and h5.attrs["seed"] == 0
        arr = {name: np.array(dataset(h5, name)) for name in ("tokens", "acts", "kind", "latents",
                                                              "window")}
        assert arr["tokens"].dtype == np.int32 and arr["acts"].dtype == np.float32
        assert arr["kind"].dtype == np.int8 and arr["latents"].dtype == np.int64
        latents, got, window = arr["latents"], arr["acts"], arr["window"]
        assert int(h5io.plain(h5.attrs["n_skipped"])) == summary["skipped"]
    encode = ex.make_encoder(str(tmp_path / "err"), str(base), str(fit), "nonlinear")
    per_seq = (CTX - SKIP) // WIN
    with torch.no_grad():
        z = encode(x).numpy()
    for i, latent in enumerate(latents):
        e = int(np.flatnonzero(window[i] >= 0)[0])
        seq, j = divmod(int(window[i, e]), per_seq)
        rows = seq * (CTX - SKIP) + j * WIN + np.arange(WIN)
        np.testing.assert_allclose(got[i, e], z[rows, latent], rtol=1e-5, atol=1e-6)
    assert json.loads(json.dumps(summary))["latents"] == 3


def test_bad_inputs_name_the_problem(tmp_path):
    x = np.random.default_rng(1).normal(size=(N_SEQ * (CTX - SKIP), D))
    acts, toks = write_corpus(tmp_path, x)
    too_long = ex.ExampleConfig(n_latents=2, ctx_len=CTX, min_examples=1)
    message = f"--ctx-len {CTX} exceeds the {CTX - SKIP} cached"
    with h5io.open_checked(acts) as a, h5io.open_checked(toks) as t, \
            pytest.raises(ValueError, match=message):
        ex.collect(a, t, lambda z: z.relu(), too_long, chunk=100)
    # a tokens file that is not the one the activations were made from
    with h5py.File(toks, "r+") as h5:
        toks_ds = dataset(h5, "tokens")
        toks_ds[:, SKIP:] = np.array(toks_ds[:, SKIP:]) + 1
    cfg = ex.ExampleConfig(n_latents=2, ctx_len=WIN, min_examples=1)
    with h5io.open_checked(acts) as a, h5io.open_checked(toks) as t, \
            pytest.raises(h5io.InputFileError, match="token ids differ"):
        ex.collect(a, t, lambda z: z.relu(), cfg, chunk=100)
