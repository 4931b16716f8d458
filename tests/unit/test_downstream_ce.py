"""Downstream CE (Figure 9): splicing settings against a hand-rolled hook, planted tables, a run."""

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from saeflow import h5io
from saeflow.dark_matter import downstream_ce as dce
from saeflow.metrics import next_token_ce
from saeflow.models import load_model, model_dims, resolve_site

SITE, SKIP = "blocks.2.hook_resid_post", 1


@pytest.fixture(scope="module")
def model(packaged_model_dir):
    return load_model(str(packaged_model_dir))[0]


@pytest.fixture
def tokens():
    ids = np.random.default_rng(0).integers(2, 49152, size=(3, 10)).astype(np.int32)
    ids[:, 0] = 1
    return ids


def _sae(d: int) -> TopKSAE:
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=8))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return sae


def _hooked_ce(model, tokens, replace) -> float:
    """Reference: a plain forward hook that overwrites the site's output at positions >= SKIP."""
    module, _ = resolve_site(model, SITE)

    def hook(_module, _inputs, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden[:, SKIP:] = replace(hidden[:, SKIP:])
        return out

    handle = module.register_forward_hook(hook)
    ids = torch.from_numpy(tokens.astype(np.int64))
    try:
        with torch.no_grad():
            return next_token_ce(model(ids).logits, ids)[:, SKIP:].mean().item()
    finally:
        handle.remove()


def test_percent_recovered_is_zero_at_the_sae_and_100_at_the_model():
    assert dce.percent_recovered(3.0, 3.0, 2.0) == 0.0
    assert dce.percent_recovered(3.0, 2.0, 2.0) == 100.0
    assert dce.percent_recovered(3.0, 2.75, 2.0) == pytest.approx(25.0)
    assert dce.percent_recovered(3.0, 3.5, 2.0) == pytest.approx(-50.0)  # worse than the SAE


def test_settings_with_a_zero_map_are_the_sae_and_the_model(model, tokens):
    d = model_dims(model)[1]
    sae = _sae(d)
    settings = dce.replacements(sae, torch.zeros(d, d, dtype=torch.float64),
                                torch.zeros(d, dtype=torch.float64))
    ce = dce.spliced_ce(model, SITE, tokens, SKIP, 2, settings)
    assert ce["n_predictions"] == 3 * (10 - 1 - SKIP)
    assert ce["sae_linear"] == pytest.approx(ce["sae"], rel=1e-6)  # + 0·x + 0
    assert ce["sae_nonlinear"] == pytest.approx(ce["clean"], rel=1e-6)  # Sae(x) + x - Sae(x)
    assert ce["sae"] > ce["clean"] + 0.1  # the random SAE does damage, so the ratio is defined
    result = dce.ce_result(ce)
    assert result["pct_recovered_sae_linear"] == pytest.approx(0.0, abs=1e-3)
    assert result["pct_recovered_sae_nonlinear"] == pytest.approx(100.0, abs=1e-3)


def test_settings_match_a_hand_rolled_forward_hook(model, tokens):
    d = model_dims(model)[1]
    sae = _sae(d)
    weight = torch.randn(d, d, dtype=torch.float64) * 0.02
    bias = torch.randn(d, dtype=torch.float64) * 0.1
    ce = dce.spliced_ce(model, SITE, tokens, SKIP, 2, dce.replacements(sae, weight, bias))
    w32, b32 = weight.float(), bias.float()
    with torch.no_grad():
        want = {
            "sae": _hooked_ce(model, tokens, sae),
            "sae_linear": _hooked_ce(model, tokens, lambda x: sae(x) + x @ w32 + b32),
            "sae_nonlinear": _hooked_ce(model, tokens,
                                        lambda x: sae(x) + (x - sae(x) - x @ w32 - b32)),
            "clean": _hooked_ce(model, tokens, lambda x: x),
        }
    for name, value in want.items():
        assert ce[name] == pytest.approx(value, rel=1e-5), name
    assert len({round(v, 4) for v in want.values()}) == 4  # the settings really differ


def test_the_true_error_map_recovers_everything(model, tokens):
    """Sae(x) + SaeError = x: with SaeError itself as 'linear error' the model is recovered."""
    d = model_dims(model)[1]
    sae = _sae(d)
    identity = dce.replacements(lambda x: torch.zeros_like(x), torch.eye(d, dtype=torch.float64),
                                torch.zeros(d, dtype=torch.float64))
    ce = dce.spliced_ce(model, SITE, tokens, SKIP, 3, identity)
    assert ce["sae_linear"] == pytest.approx(ce["clean"], rel=1e-6)  # 0 + x·I
    assert dce.percent_recovered(ce["sae"], ce["sae_linear"], ce["clean"]) == pytest.approx(100)
    del sae


def _records() -> pd.DataFrame:
    rows = []
    for width in (64, 128, 256):
        for k in (8, 16, 32):
            rows.append({"sae_id": f"w{width}-k{k}", "width": width, "k": k, "l0": k,
                         "mean_l0": k - 0.5, "ce_sae": 3.0, "ce_clean": 2.0,
                         "ce_sae_linear": 2.9, "ce_sae_nonlinear": 2.5 - width / 1000,
                         "pct_recovered_sae_linear": 10.0,
                         "pct_recovered_sae_nonlinear": 50.0 + width / 10})
    return pd.DataFrame(rows)


def test_figure9_table_panels():
    table = dce.figure9_table(_records(), headline_l0=20, k_width=None)
    width_panel = table[table.panel == "width"]
    assert set(width_panel.l0) == {16}  # |16 - 20| < |32 - 20|
    assert sorted(set(width_panel.width)) == [64, 128, 256]
    k_panel = table[table.panel == "k"]
    assert set(k_panel.width) == {64} and sorted(set(k_panel.l0)) == [8, 16, 32]
    assert len(table) == 2 * (3 + 3)  # two settings per SAE per panel
    nl = width_panel.loc[width_panel.setting == "sae_nonlinear"].sort_values("width")
    assert list(nl.pct_recovered) == [56.4, 62.8, 75.6]
    with pytest.raises(ValueError, match="--k-width 100"):
        dce.figure9_table(_records(), 20, k_width=100)


def test_headline_picks_the_closest_l0_per_width_when_l0s_differ():
    """Gemma Scope style: measured L0s differ per width; each width keeps its closest one."""
    saes = pd.DataFrame({"sae_id": list("abcde"), "width": [16, 16, 32, 32, 64],
                         "l0": [41.0, 70.0, 58.0, 90.0, 20.0]})
    picked = dce.headline_saes(saes, 60)
    assert list(picked.sae_id) == ["b", "c", "e"]


def test_run_writes_the_record_from_disk_files(model, packaged_model_dir, tokens, tmp_path):
    d = model_dims(model)[1]
    sae = _sae(d)
    sae.save_model(str(tmp_path / "sae"))
    weight = torch.randn(d, d, dtype=torch.float64) * 0.02
    with h5py.File(tmp_path / "fit.h5", "w") as h5:
        h5["weight"], h5["bias"] = weight.numpy(), np.zeros(d)
        h5io.mark_complete(h5)
    with h5py.File(tmp_path / "tokens.h5", "w") as h5:
        h5["tokens"] = tokens
        h5io.mark_complete(h5)
    args = dce.parse_args([
        "run", "--sae", str(tmp_path / "sae"), "--fit", str(tmp_path / "fit.h5"),
        "--model", str(packaged_model_dir), "--tokens", str(tmp_path / "tokens.h5"),
        "--site", SITE, "--out", str(tmp_path / "ce.json"), "--sae-id", "x", "--seqs", "2",
        "--batch-size", "2", "--skip-positions", str(SKIP)])
    result = dce.run(args)
    assert result["k"] == 8 and result["width"] == 2 * d and result["seqs"] == 2
    assert result["n_predictions"] == 2 * (10 - 1 - SKIP)
    want = dce.percent_recovered(result["ce_sae"], result["ce_sae_nonlinear"], result["ce_clean"])
    assert result["pct_recovered_sae_nonlinear"] == pytest.approx(want)
    assert (tmp_path / "ce.json").exists()


def test_a_fit_of_the_wrong_width_is_rejected(tmp_path):
    with h5py.File(tmp_path / "fit.h5", "w") as h5:
        h5["weight"], h5["bias"] = np.zeros((4, 4)), np.zeros(4)
        h5io.mark_complete(h5)
    with pytest.raises(h5io.InputFileError, match="'weight' has shape"):
        dce.load_error_map(str(tmp_path / "fit.h5"), 8)


def test_figure9_plot_is_drawn_from_its_table_only_and_reproducibly(tmp_path):
    from saeflow.figures import error_effects

    dce.figure9_table(_records(), 20, None).to_csv(tmp_path / "figure9.csv", index=False)
    for name in ("a.pdf", "b.pdf"):
        error_effects.main(["--figure", "9", "--table", str(tmp_path / "figure9.csv"),
                            "--out", str(tmp_path / name)])
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
    pd.DataFrame({"panel": ["width"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(h5io.InputFileError, match="bad.csv: columns .*'pct_recovered'"):
        error_effects.main(["--figure", "9", "--table", str(tmp_path / "bad.csv"),
                            "--out", str(tmp_path / "c.pdf")])
    assert not (tmp_path / "c.pdf").exists()
