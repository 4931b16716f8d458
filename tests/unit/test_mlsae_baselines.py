"""Single-layer baselines of the MLSAEs: their ids and config checks, the same tokens in the same
order as the MLSAE's layer, evaluation without layer distributions, the spliced losses, and the
comparison table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_mlsae_train import multilayer_toy, write_layers

from saeflow.metrics import next_token_ce
from saeflow.mlsae.baselines import CompareError, compare
from saeflow.mlsae.config import MLSAEConfigError, baselines
from saeflow.mlsae.evaluate import main as evaluate_main
from saeflow.mlsae.evaluate import spliced_losses
from saeflow.mlsae.math import reconstruct
from saeflow.mlsae.trainer import (
    LayerBatches,
    LoadedMLSAE,
    MLSAETrainConfig,
    load_mlsae,
    save_mlsae,
    train_mlsae,
)
from saeflow.topk import TopKParams

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


def _test_config() -> dict:
    return yaml.safe_load((REPO / "config/test.yaml").read_text())


def test_baseline_ids_and_their_mlsae() -> None:
    config = _test_config()
    config["mlsae"].update(expansion_factors=[1, 2], k=[8], baseline_layers=[3, 1, 3])
    table = baselines(config)
    assert sorted(table) == ["sae-x1-k8-layer1", "sae-x1-k8-layer3",
                             "sae-x2-k8-layer1", "sae-x2-k8-layer3"]
    assert table["sae-x2-k8-layer3"] == {"mlsae_id": "mlsae-x2-k8", "layer": 3,
                                         "expansion_factor": 2, "k": 8}
    config["mlsae"]["baseline_mlsaes"] = ["mlsae-x2-k8"]
    assert sorted(baselines(config)) == ["sae-x2-k8-layer1", "sae-x2-k8-layer3"]
    config["mlsae"]["baseline_layers"] = []
    assert baselines(config) == {}


@pytest.mark.parametrize("update,needle", [
    ({"baseline_layers": [7]}, "mlsae.baseline_layers: layer 7 is not read"),
    ({"baseline_layers": [1], "baseline_mlsaes": ["mlsae-x9-k8"]},
     "mlsae.baseline_mlsaes: 'mlsae-x9-k8' is not a trained MLSAE"),
])
def test_bad_baselines_name_their_key(update: dict, needle: str) -> None:
    config = copy.deepcopy(_test_config())
    config["mlsae"].update(update)
    with pytest.raises(MLSAEConfigError, match=needle):
        baselines(config)


def test_a_baseline_sees_the_mlsaes_rows_of_its_layer(tmp_path: Path) -> None:
    """Same seed and chunking: the one-layer stream is the MLSAE's stream at that layer."""
    acts = torch.randn(3, 700, 8)
    paths = write_layers(tmp_path, acts, chunk=100)
    cfg = MLSAETrainConfig(d_in=8, d_sae=16, k=2, layers=[0, 1, 2], total_tokens=700,
                           batch_size=64, buffer_tokens=300)
    single = MLSAETrainConfig(**{**cfg.__dict__, "layers": [1]})
    multi, one = LayerBatches(paths, cfg), LayerBatches(paths[1:2], single)
    try:
        for _ in range(25):  # past one epoch (11 batches)
            assert torch.equal(next(multi)[1], next(one)[0])
    finally:
        multi.close()
        one.close()


def _perfect_sae(d: int) -> TopKParams:
    """W_enc = [I, -I], W_dec = [I; -I], k = d: the TopK keeps |x_i| and decodes x exactly."""
    eye = torch.eye(d)
    return TopKParams(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye]),
                      torch.zeros(d))


def test_spliced_losses_of_a_perfect_and_a_null_reconstruction(tiny_lm) -> None:
    tokens = np.random.default_rng(0).integers(0, 64, size=(5, 12))
    perfect = LoadedMLSAE(_perfect_sae(16), 16, [0, 1, 2], True)
    out = spliced_losses(perfect, tiny_lm, [0, 2], tokens, skip=1, batch_size=2)
    ids = torch.from_numpy(tokens)
    with torch.no_grad():
        ce = float(next_token_ce(tiny_lm(ids).logits, ids)[:, 1:].mean())
    for row in out:
        assert row["ce_clean"] == pytest.approx(ce, rel=1e-9)
        assert abs(row["delta_ce"]) < 1e-4 and abs(row["kl"]) < 1e-5, row
    null = LoadedMLSAE(TopKParams(*(torch.zeros_like(p) for p in _perfect_sae(16))), 16,
                       [0, 1, 2], True)
    apart = [spliced_losses(null, tiny_lm, [layer], tokens, skip=1, batch_size=2)[0]
             for layer in (0, 2)]
    together = spliced_losses(null, tiny_lm, [0, 2], tokens, skip=1, batch_size=2)
    for a, b in zip(apart, together):
        assert a == pytest.approx(b, rel=1e-9)  # one clean pass for all layers changes nothing
        assert b["kl"] > 1e-3 and b["ce_spliced"] != b["ce_clean"]
    # the reference: saeflow.metrics on the logits of a forward with the null splice at layer 2
    def splice(_module, _inputs, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, 1:] = reconstruct(null.params, hidden[:, 1:], null.k)[0]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = tiny_lm.model.layers[2].register_forward_hook(splice)
    with torch.no_grad():
        patched = tiny_lm(ids).logits
    handle.remove()
    with torch.no_grad():
        clean = tiny_lm(ids).logits
    assert together[1]["ce_spliced"] == pytest.approx(
        float(next_token_ce(patched, ids)[:, 1:].mean()), rel=1e-9)
    n = ids.shape[0] * (ids.shape[1] - 2)
    logp, logq = (torch.log_softmax(x.double(), dim=-1) for x in (clean, patched))
    kl = (logp.exp() * (logp - logq)).sum(dim=-1)  # KL(clean || spliced) from its definition
    assert together[1]["kl"] == pytest.approx(float(kl[:, 1:-1].sum()) / n, rel=1e-9)


def test_single_layer_evaluation_skips_the_distributions(tmp_path: Path) -> None:
    toy = multilayer_toy(1200, 3, 24, 16, 3, seed=2)
    paths = write_layers(tmp_path, toy["acts"], chunk=300)
    cfg = MLSAETrainConfig(d_in=16, d_sae=32, k=3, layers=[1], total_tokens=1200,
                           batch_size=128, lr=3e-3, k_aux=8, buffer_tokens=600)
    train_mlsae(paths[1:2], tmp_path / "sae", cfg, tmp_path / "ck", progress=False)
    (tmp_path / "eval").mkdir()
    out = {n: tmp_path / "eval" / n for n in ("layers.csv", "summary.json")}
    evaluate_main(["run", "--sae", str(tmp_path / "sae"), "--acts", paths[1], "--layers", "1",
                   "--model", "unused", "--tokens", "unused", "--sae-id", "sae-x2-k3-layer1",
                   "--downstream-seqs", "0", "--chunk-tokens", "500",
                   "--layer-csv", str(out["layers.csv"]), "--summary", str(out["summary.json"])])
    rows = pd.read_csv(out["layers.csv"])
    assert list(rows["layer"]) == [1] and list(rows["sae_id"]) == ["sae-x2-k3-layer1"]
    sae = load_mlsae(tmp_path / "sae")
    x = toy["acts"][1]
    recon = reconstruct(sae.params, x, sae.k)[0].double()
    fvu = float((recon - x.double()).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    assert rows["fvu"].iloc[0] == pytest.approx(fvu, rel=1e-4)
    summary = json.loads(out["summary.json"].read_text())
    assert summary["n_layers"] == 1 and summary["mean_fvu"] == pytest.approx(fvu, rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["layers.csv",
                                                                      "summary.json"]
    with pytest.raises(SystemExit, match="two layers or more"):
        evaluate_main(["run", "--sae", str(tmp_path / "sae"), "--acts", paths[1], "--layers",
                       "1", "--model", "m", "--tokens", "t", "--sae-id", "s",
                       "--downstream-seqs", "0", "--layer-csv", str(tmp_path / "a.csv"),
                       "--summary", str(tmp_path / "a.json"), "--dists",
                       str(tmp_path / "d.safetensors"), "--variances", str(tmp_path / "v.csv")])


def test_comparison_pairs_each_baseline_with_its_mlsae_at_its_layer() -> None:
    mlsae = pd.DataFrame({"sae_id": ["m1"] * 3 + ["m2"] * 3, "layer": [0, 1, 2] * 2,
                          "fvu": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                          "delta_ce": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    single = pd.DataFrame({"sae_id": ["b-m1-1", "b-m2-2"], "layer": [1, 2],
                           "fvu": [0.05, 0.3], "delta_ce": [0.5, 1.5]})
    table = compare(mlsae, single, {"b-m2-2": "m2", "b-m1-1": "m1"})
    assert list(table["sae_id"]) == ["b-m1-1", "b-m2-2"]
    assert list(table["fvu_mlsae"]) == [0.2, 0.6] and list(table["fvu_single"]) == [0.05, 0.3]
    assert list(table["delta_ce_mlsae"]) == [2.0, 6.0]
    assert list(table["delta_ce_single"]) == [0.5, 1.5]
    assert list(table["fvu_ratio"]) == pytest.approx([4.0, 2.0])
    assert "kl_mlsae" not in table  # only the metrics both tables have
    with pytest.raises(CompareError, match="MLSAE 'm3' has 0 rows at layer 2"):
        compare(mlsae, single, {"b-m2-2": "m3"})
    with pytest.raises(CompareError, match="baseline 'nope': 0 rows"):
        compare(mlsae, single, {"nope": "m1"})


def test_saved_single_layer_sae_keeps_its_layer(tmp_path: Path) -> None:
    cfg = MLSAETrainConfig(d_in=4, d_sae=8, k=2, layers=[5], total_tokens=10)
    save_mlsae(tmp_path / "s", _perfect_sae(4), cfg)
    assert load_mlsae(tmp_path / "s").layers == [5]
    meta = json.loads((tmp_path / "s" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.5.hook_resid_post"
