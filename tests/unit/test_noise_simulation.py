"""Synthetic noise simulation (Figure 15, Table 1): planted mechanisms give the known answers."""

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from saeflow import h5io
from saeflow.dark_matter import noise_simulation as ns
from saeflow.dark_matter.regression import split_mask

D, D_SAE, N = 24, 96, 2400


@pytest.fixture
def sae():
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=D_SAE, k=6))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


def _noise(shape, unit, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * unit, torch.randn(shape, generator=g) * unit


def test_ablation_zeroes_the_least_frequent_latents():
    freq = np.array([0.5, 0.01, 0.2, 0.0, 0.01, 0.9])
    order = ns.ablation_order(freq)
    assert order.tolist() == [3, 1, 4, 2, 0, 5]  # ties keep the lower id first
    latents = torch.ones(2, 6)
    out = ns.ablated(latents, order, 50)  # floor(3) latents
    assert out[:, [3, 1, 4]].abs().sum() == 0 and out[:, [0, 2, 5]].eq(1).all()
    assert latents.eq(1).all()  # the input is left alone
    assert ns.ablated(latents, order, 0).eq(1).all()


def test_no_noise_no_ablation_is_a_perfect_sae():
    x = torch.randn(N, D)
    eps_a, eps_r = _noise(x.shape, 1.0)
    result = ns.simulate(x, x.clone(), eps_a, eps_r, 0.0, 0.0, split_mask(N, 0.5, 0))
    assert result.fvu_recon == 0 and result.fvu_recon_linear == pytest.approx(0, abs=1e-12)


def test_reconstruction_noise_is_all_nonlinear():
    x = torch.randn(N, D) * 2 + 1
    unit = ns.noise_scale(x, 0.2)
    assert unit == pytest.approx(0.4, rel=0.05)  # 0.2 × std 2
    eps_a, eps_r = _noise(x.shape, unit)
    is_test = split_mask(N, 0.5, 0)
    result = ns.simulate(x, x, eps_a, eps_r, 0.0, 1.5, is_test)
    expected = (1.5 * unit) ** 2 / 4.0  # noise variance over signal variance, per coordinate
    assert result.fvu_recon == pytest.approx(expected, rel=0.08)
    # x carries no trace of the noise: the regression only overfits (held out, slightly worse)
    assert result.fvu_recon <= result.fvu_recon_linear < result.fvu_recon * 1.05


def test_activation_noise_off_the_signal_subspace_is_linear():
    """x_true of rank 3 in 24 dims: noise in the other 21 dims is read off x exactly."""
    basis = torch.randn(3, D)
    x_true = torch.randn(N, 3) @ basis
    unit = ns.noise_scale(x_true, 0.3)
    eps_a, eps_r = _noise(x_true.shape, unit)
    result = ns.simulate(x_true, x_true, eps_a, eps_r, 1.0, 0.0, split_mask(N, 0.5, 0))
    assert result.fvu_recon - result.fvu_recon_linear > 0.8 * result.fvu_recon
    assert result.fvu_recon_linear < 3 / D * result.fvu_recon * 1.5


def test_table1_correlations_have_the_mechanisms_signs(sae):
    x = torch.randn(N, D)
    with torch.inference_mode():
        latents = sae.encode(x)
        x_true = sae.decode(latents)
    freq = (latents != 0).float().mean(0).numpy()
    eps_a, eps_r = _noise(x_true.shape, ns.noise_scale(x_true, 0.3))
    todo = ns.conditions(1.0, 0.6, [0, 1, 2, 3])
    assert (todo.kind == "figure15").sum() == 4 and (todo.kind == "table1").sum() == 16
    runs = ns.run_grid(x_true, sae.decode, latents, ns.ablation_order(freq), [0, 30], todo,
                       eps_a, eps_r, split_mask(N, 0.5, 0))
    assert len(runs) == 2 * 20
    fig = runs[runs.kind == "figure15"]
    clean = fig.loc[(fig.act_noise == 0) & (fig.rec_noise == 0)].set_index("ablate_percent")
    assert clean.fvu_recon[0.0] == 0 and clean.fvu_recon[30.0] > 0.01  # absent features
    table = ns.correlation_table(runs).set_index("noise")
    assert table.loc["activation noise", "linear_error"] > 0.8
    assert table.loc["reconstruction noise", "nonlinear_error"] > 0.8
    assert abs(table.loc["reconstruction noise", "linear_error"]) < 0.3


def _files(tmp_path, sae):
    x = torch.randn(N, D).numpy().astype(np.float32)
    with torch.inference_mode():
        freq = (sae.encode(torch.from_numpy(x)) != 0).double().mean(0).numpy()
    with h5py.File(tmp_path / "acts.h5", "w") as h5:
        h5["acts"], h5["tokens"] = x, np.arange(N, dtype=np.int32)
        h5io.mark_complete(h5)
    with h5py.File(tmp_path / "eval.h5", "w") as h5:
        h5["latent_freq"] = freq
        h5io.mark_complete(h5)
    sae.save_model(str(tmp_path / "sae"))


def test_run_and_tables_from_files_are_deterministic(tmp_path, sae):
    _files(tmp_path, sae)
    common = ["--sae", str(tmp_path / "sae"), "--acts", str(tmp_path / "acts.h5"),
              "--sae-eval", str(tmp_path / "eval.h5"), "--tokens", "1000",
              "--ablate-percents", "0", "50", "--grid", "0", "2", "--noise-unit", "0.2"]
    for name in ("a.csv", "b.csv"):
        ns.main(["run", *common, "--out", str(tmp_path / name)])
    a = (tmp_path / "a.csv").read_text()
    assert a == (tmp_path / "b.csv").read_text()
    runs = pd.read_csv(tmp_path / "a.csv")
    assert len(runs) == 2 * (4 + 4) and set(runs.n_tokens) == {1000}
    ns.main(["tables", "--runs", str(tmp_path / "a.csv"), "--figure15",
             str(tmp_path / "f15.csv"), "--table1", str(tmp_path / "t1.csv")])
    assert len(pd.read_csv(tmp_path / "f15.csv")) == 8
    assert list(pd.read_csv(tmp_path / "t1.csv").noise) == ["activation noise",
                                                           "reconstruction noise"]


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        ns.parse_args(["run", "--sae", "s", "--acts", "a", "--sae-eval", "e", "--out", "o",
                       "--grid", "1", "1"])
    with pytest.raises(h5io.InputFileError, match="file not found"):
        ns.load_inputs(ns.parse_args(["run", "--sae", "s", "--acts", str(tmp_path / "no.h5"),
                                      "--sae-eval", "e", "--out", "o"]),
                       TopKSAE(TopKSAEConfig(d_in=D, d_sae=D_SAE, k=6)))


def test_figure15_is_drawn_from_the_table(tmp_path, sae):
    from saeflow.figures import error_effects

    _files(tmp_path, sae)
    ns.main(["run", "--sae", str(tmp_path / "sae"), "--acts", str(tmp_path / "acts.h5"),
             "--sae-eval", str(tmp_path / "eval.h5"), "--tokens", "600", "--ablate-percents",
             "0", "40", "--grid", "0", "1", "--out", str(tmp_path / "runs.csv")])
    ns.main(["tables", "--runs", str(tmp_path / "runs.csv"), "--figure15",
             str(tmp_path / "f15.csv"), "--table1", str(tmp_path / "t1.csv")])
    error_effects.main(["--figure", "15", "--table", str(tmp_path / "f15.csv"), "--out",
                        str(tmp_path / "f15.pdf"), "--no-log-x"])
    assert (tmp_path / "f15.pdf").read_bytes().startswith(b"%PDF")
