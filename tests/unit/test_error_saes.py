"""Error SAEs: on-the-fly error components against a float64 reference, and a short training."""

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from saeflow import error_saes, h5io, topk
from saeflow.batches import ActivationBatches
from saeflow.dark_matter.regression import F64
from saeflow.sae_eval import summarize
from saeflow.saes import load_sae

D, M, K, N = 16, 32, 3, 3000


# Tiny shapes: OpenMP hand-offs cost more than they save (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def write_acts(path: Path, x: torch.Tensor) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("acts", data=x.numpy(), chunks=(min(256, len(x)), x.shape[1]))
        h5["tokens"] = np.arange(len(x), dtype=np.int32) % 97
        h5io.write_attrs(h5, {"model": "toy", "corpus": "toy", "site": "blocks.0.hook_resid_post"})
        h5io.mark_complete(h5)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Activations that are sparse codes over a dictionary plus a quadratic term (so the base
    SAE's error has a nonlinear part), and a base TopK SAE built from a noisy dictionary."""
    tmp = tmp_path_factory.mktemp("error_saes")
    g = torch.Generator().manual_seed(1)
    atoms = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    idx = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(N)])
    codes = torch.zeros(N, M).scatter_(1, idx, torch.rand(N, K, generator=g) + 0.5)
    x = codes @ atoms + 0.3 * (codes[:, :D] ** 2) + 0.05 * torch.randn(N, D, generator=g)
    noisy = torch.nn.functional.normalize(atoms + 0.3 * torch.randn(M, D, generator=g), dim=1)
    params = topk.TopKParams(noisy.T.contiguous(), torch.zeros(M), noisy, torch.zeros(D))
    cfg = topk.TopKTrainConfig(d_in=D, d_sae=M, k=K, total_tokens=1)
    base = topk.save_topk(tmp / "base", params, cfg)
    acts = write_acts(tmp / "acts.h5", x.float())
    fit = tmp / "fit.h5"
    error_saes.main(["fit", "--acts", str(acts), "--base-sae", str(base), "--out", str(fit),
                     "--chunk-tokens", "700"])
    return {"tmp": tmp, "x": x.float(), "params": params, "base": base, "acts": acts, "fit": fit}


def reference_error(params: topk.TopKParams, x: torch.Tensor) -> torch.Tensor:
    """x - Sae(x) in float64, by hand (TopK encode, dense decode)."""
    x64 = x.to(F64)
    pre = (x64 - params.b_dec.to(F64)) @ params.W_enc.to(F64) + params.b_enc.to(F64)
    vals, idx = pre.topk(K, dim=1)
    z = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    return x64 - (z @ params.W_dec.to(F64) + params.b_dec.to(F64))


def test_fit_is_the_float64_least_squares_solution(setup):
    fit = error_saes.read_fit(setup["fit"], D)
    x64 = setup["x"].to(F64)
    err = reference_error(setup["params"], setup["x"])
    design = torch.cat([x64, torch.ones(N, 1, dtype=F64)], dim=1)
    solution = torch.linalg.lstsq(design, err).solution
    torch.testing.assert_close(fit.weight, solution[:-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fit.bias, solution[-1], atol=1e-5, rtol=1e-4)


def test_on_the_fly_components_match_the_float64_reference(setup):
    fit = error_saes.read_fit(setup["fit"], D)
    sae = load_sae(setup["base"])
    with ActivationBatches(setup["acts"], 128, seed=3) as raw:
        stream = error_saes.ComponentBatches(raw, sae, fit, "nonlinear")
        batch = next(stream)
        state = stream.state_dict()
    with ActivationBatches(setup["acts"], 128, seed=3) as raw:
        x = next(raw)  # the same rows, in the same order
    err = reference_error(setup["params"], x)
    linear = x.to(F64) @ fit.weight + fit.bias
    torch.testing.assert_close(batch.to(F64), err - linear, atol=2e-5, rtol=1e-4)
    assert state["batches_served"] == 1
    # linear + nonlinear add back to the error (float64 arithmetic)
    lin, nonlin = error_saes.split_error(x, err, fit)
    torch.testing.assert_close(lin, linear, atol=1e-12, rtol=0)
    torch.testing.assert_close(lin + nonlin, err, atol=1e-12, rtol=0)
    # the parts are orthogonal in sum on the fitted rows (normal equations), so this is real
    assert float(nonlin.square().sum()) < float(err.square().sum())


def test_short_training_reduces_the_target_fvu(setup):
    out = setup["tmp"] / "nonlinear_sae"
    result = error_saes.main([
        "train", "--acts", str(setup["acts"]), "--base-sae", str(setup["base"]),
        "--fit", str(setup["fit"]), "--component", "nonlinear", "--base-sae-id", "base",
        "--out", str(out), "--checkpoint-dir", str(setup["tmp"] / "ckpt"), "--d-sae", "64",
        "--k", "4", "--tokens", str(256 * 60), "--batch-size", "256", "--lr", "3e-3",
        "--lr-warmup-steps", "5", "--checkpoint-every", "20"])
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["saeflow_error_sae"]["component"] == "nonlinear"
    assert cfg["metadata"]["saeflow_error_sae"]["base_sae_id"] == "base"
    assert result["steps"] == 60
    # FVU of the trained SAE on the nonlinear targets vs that of the initial (b_dec-only) model
    fit = error_saes.read_fit(setup["fit"], D)
    target = error_saes.component_of(setup["x"], reference_error(setup["params"], setup["x"]),
                                     fit, "nonlinear")
    total = (target - target.mean(0)).square().sum()

    def fvu(params: topk.TopKParams) -> float:
        recon = topk.decode(params, topk.encode(params, target, 4))
        return float((recon - target).square().sum() / total)

    trained = topk.load_topk(out).params
    untrained = topk.init_params(D, 64, topk.geometric_median(target), seed=0)
    with torch.no_grad():
        recon = load_sae(out).decode(load_sae(out).encode(target))
    assert float((recon - target).square().sum() / total) == pytest.approx(fvu(trained), rel=1e-4)
    trained_fvu, first_fvu = fvu(trained), fvu(untrained)
    assert trained_fvu < 0.6 * first_fvu and trained_fvu < 0.5


def test_fit_rejects_a_base_sae_of_another_width(setup, tmp_path):
    acts = write_acts(tmp_path / "wide.h5", torch.randn(100, D + 1))
    with pytest.raises(h5io.InputFileError, match="d_in 16"):
        error_saes.fit_map(str(acts), str(setup["base"]), str(tmp_path / "f.h5"), 50)
    assert not (tmp_path / "f.h5").exists()


def test_an_interrupted_training_resumes_to_the_same_weights(setup, tmp_path, capsys):
    fit = str(setup["fit"])
    source = error_saes.ErrorSAE(str(setup["base"]), "base", "linear", fit)
    cfg = topk.TopKTrainConfig(d_in=D, d_sae=32, k=3, total_tokens=128 * 12, batch_size=128,
                               lr_warmup_steps=2, checkpoint_every_steps=4)
    acts = str(setup["acts"])
    error_saes.train_error_sae(acts, str(tmp_path / "whole"), cfg, source, str(tmp_path / "c1"))
    part = error_saes.train_error_sae(acts, str(tmp_path / "part"), cfg, source,
                                      str(tmp_path / "c2"), stop_after_steps=6)
    assert part["steps"] == 6 and not (tmp_path / "part").exists()
    capsys.readouterr()
    error_saes.train_error_sae(acts, str(tmp_path / "part"), cfg, source, str(tmp_path / "c2"))
    assert "resuming from the checkpoint at step 6" in capsys.readouterr().err
    whole, resumed = topk.load_topk(tmp_path / "whole"), topk.load_topk(tmp_path / "part")
    for a, b in zip(whole.params, resumed.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_sae_table_lists_error_saes_with_what_they_reconstruct(setup, tmp_path):
    out = tmp_path / "base-linear_error"
    error_saes.main([
        "train", "--acts", str(setup["acts"]), "--base-sae", str(setup["base"]),
        "--fit", str(setup["fit"]), "--component", "linear", "--base-sae-id", "base",
        "--out", str(out), "--checkpoint-dir", str(tmp_path / "ckpt"), "--d-sae", "32",
        "--k", "4", "--tokens", str(256 * 10), "--batch-size", "256", "--lr-warmup-steps", "2",
        "--hook-name", "blocks.0.hook_resid_post"])
    metrics = tmp_path / "base.metrics.json"  # what evaluate_sae writes for the base SAE
    metrics.write_text(json.dumps({"sae_id": "base", "fvu": 0.5, "mean_l0": float(K),
                                   "site": "blocks.0.hook_resid_post"}))
    table = summarize([str(metrics)], str(tmp_path / "sae_metrics.csv"), [str(out / "cfg.json")])
    assert list(table.sae_id) == ["base", "base-linear_error"]
    assert list(table.trained_on) == ["activations", "linear error of base"]
    assert list(table.metrics_from) == ["evaluation", "training"]
    last = pd.read_csv(tmp_path / "base-linear_error.train_log.csv").iloc[-1]
    row = table.set_index("sae_id").loc["base-linear_error"]
    assert row.fvu == pytest.approx(last.fvu) and row.d_sae == 32 and row.n_tokens == 2560
    assert row.site == "blocks.0.hook_resid_post"
    assert pd.read_csv(tmp_path / "sae_metrics.csv").shape == table.shape
