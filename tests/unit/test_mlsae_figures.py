"""saeflow.figures.mlsae and the MLSAE tables: the dists heatmap's table is the layer
distributions, sorted; the histogram is a density; the pair heatmap counts the pairs of
:func:`pair_histogram`; every summary PDF is drawn beside its CSV; the sweep and layer-std
tables against brute-force references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from saeflow.figures.mlsae import main
from saeflow.mlsae.evaluate import layer_std_row, sweep_table
from saeflow.mlsae.math import summarise_dists
from saeflow.mlsae.prompt import prompt_table
from saeflow.mlsae.similarity import pair_histogram
from saeflow.mlsae.trainer import MLSAETrainConfig, save_mlsae
from saeflow.topk import TopKParams


def test_dists_table_and_plot(tmp_path: Path) -> None:
    totals = torch.rand(5, 12)
    totals[:, 3] = 0.0  # a dead latent is left out
    totals[:, 7] = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0])  # fires at the last layer only
    path = tmp_path / "dists.safetensors"
    save_file({"counts": (totals > 0).float(), "totals": totals}, str(path))
    main(["dists", "--dists", str(path), "--sae-id", "x", "--csv", str(tmp_path / "t.csv"),
          "--pdf", str(tmp_path / "t.pdf")])
    table = pd.read_csv(tmp_path / "t.csv")
    assert sorted(table.latent.unique()) == [i for i in range(12) if i != 3]
    for _, rows in table.groupby("latent"):
        assert abs(float(rows["prob"].to_numpy().sum()) - 1.0) < 1e-9
    first = table[table.layer == 0].set_index("rank").sort_index()
    assert first["layer_mean"].is_monotonic_increasing
    assert int(first["latent"].iloc[-1]) == 7 and float(first["layer_mean"].iloc[-1]) == 4.0
    assert (tmp_path / "t.pdf").read_bytes().startswith(b"%PDF")


def test_histogram_and_pair_heatmap_of_one_mlsae(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    totals = torch.rand(4, 30, generator=gen)
    totals[:, 5] = 0.0
    save_file({"counts": (totals > 0).float(), "totals": totals}, str(tmp_path / "d.st"))
    cfg = MLSAETrainConfig(d_in=8, d_sae=30, k=2, layers=[0, 1, 2, 3], total_tokens=1)
    w = torch.randn(30, 8, generator=gen)
    save_mlsae(tmp_path / "sae", TopKParams(w.T.contiguous(), torch.zeros(30), w,
                                            torch.zeros(8)), cfg)
    out = {n: str(tmp_path / n) for n in ("t.csv", "t.pdf", "h.csv", "h.pdf", "c.csv", "c.pdf")}
    main(["dists", "--dists", str(tmp_path / "d.st"), "--sae-id", "x", "--csv", out["t.csv"],
          "--pdf", out["t.pdf"], "--hist-csv", out["h.csv"], "--hist-pdf", out["h.pdf"],
          "--sae", str(tmp_path / "sae"), "--cos-csv", out["c.csv"], "--cos-pdf", out["c.pdf"]])
    hist = pd.read_csv(out["h.csv"])
    assert len(hist) == 16 * 4
    width = hist["layer_hi"] - hist["layer_lo"]
    assert float((hist["density"] * width).to_numpy().sum()) == pytest.approx(1.0)
    pairs = pd.read_csv(out["c.csv"])
    alive = [i for i in range(30) if i != 5]
    mean = summarise_dists(totals[:, alive].double()).layer_mean
    ref = pair_histogram(w[alive], mean, (64, 512), (0.0, 5.0), (-0.25, 0.25))
    assert int(pairs["count"].to_numpy().sum()) == int(ref.sum()) > 0
    for name in ("t.pdf", "h.pdf", "c.pdf"):
        assert Path(out[name]).read_bytes().startswith(b"%PDF")


def test_summary_figures_each_beside_its_csv(tmp_path: Path) -> None:
    tables = {
        "mmcs": pd.DataFrame({"sae_a": ["a", "a", "b", "b"], "sae_b": ["a", "b", "a", "b"],
                              "mean": [0.2, 0.9, 0.8, 0.3]}),
        "resid": pd.DataFrame({"layer": [0, 1, 2], "next_layer": [1, 2, -1],
                               "cos_sim_mean": [0.8, 0.9, None], "cos_sim_std": [0.1, 0.1, None],
                               "cos_sim_raw_mean": [0.9, 0.95, None],
                               "cos_sim_raw_std": [0.05, 0.05, None]}),
        "embed-latents": pd.DataFrame({"sae_id": ["a"] * 3, "in_cos_sim": [0.1, 0.2, 0.3],
                                       "out_cos_sim": [0.2, 0.2, 0.4]}),
        "layer-std": pd.DataFrame({"sae_id": ["a", "b"], "mean": [0.5, 0.7], "std": [0.1, 0.2]}),
        "sweep": pd.DataFrame({"sae_id": ["a", "b", "c", "d"],
                               "expansion_factor": [1.0, 1.0, 2.0, 2.0], "k": [8, 16, 8, 16],
                               "mean_fvu": [0.4, 0.3, 0.35, 0.25],
                               "mean_delta_ce": [1.0, 0.8, 0.9, 0.7]}),
    }
    args = ["summary", "--out-dir", str(tmp_path / "plots")]
    for name, frame in tables.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        args += [f"--{name}", str(tmp_path / f"{name}.csv")]
    main(args)
    for name in ("mmcs", "resid_cos_sim", "embed_cos_sim", "layer_std", "sweep"):
        assert (tmp_path / "plots" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
        assert (tmp_path / "plots" / f"{name}.csv").is_file()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "plots" / "sweep.csv"),
                                  tables["sweep"])


def test_sweep_and_layer_std_tables() -> None:
    summaries = pd.DataFrame({"sae_id": ["m-x2-k8", "m-x1-k16", "m-x1-k8"],
                              "d_sae": [32, 16, 16], "d_in": [16, 16, 16], "k": [8, 16, 8],
                              "mean_fvu": [0.1, 0.2, 0.3], "mean_delta_ce": [1.0, 2.0, 3.0]})
    sweep = sweep_table(summaries)
    assert list(sweep["sae_id"]) == ["m-x1-k8", "m-x1-k16", "m-x2-k8"]
    assert list(sweep["expansion_factor"]) == [1.0, 1.0, 2.0]
    assert list(sweep["mean_fvu"]) == [0.3, 0.2, 0.1]
    totals = torch.rand(5, 40, generator=torch.Generator().manual_seed(4))
    totals[:, :3] = 0.0  # never fired: left out, as the original's np.nan*
    totals[:, 3] = torch.tensor([0.0, 0.0, 7.0, 0.0, 0.0])  # one layer: std 0
    row = layer_std_row("m", totals)
    fired = totals[:, 3:].double()
    probs = (fired / fired.sum(0)).numpy()
    layers = np.arange(5)[:, None]
    mean = (probs * layers).sum(0)
    std = np.sqrt((probs * (layers - mean) ** 2).sum(0))
    assert row["n_fired"] == 37 and row["n_layers"] == 5
    assert row["mean"] == pytest.approx(float(np.mean(std)), abs=1e-9)
    assert row["std"] == pytest.approx(float(np.std(std)), abs=1e-9)
    assert row["mean_rel"] == pytest.approx(float(np.mean(std)) / 5, abs=1e-9)


def test_prompt_table_against_loops() -> None:
    gen = torch.Generator().manual_seed(5)
    lat = torch.rand(3, 4, 6, generator=gen) * (torch.rand(3, 4, 6, generator=gen) > 0.6)
    lat[:, 1, 2] = torch.tensor([0.0, 0.0, 5e-4])  # below the threshold: left out
    table = prompt_table(lat, ["a", "b", "c", "d"], [4, 5, 6], "m")
    pairs = [(p, j) for p in range(4) for j in range(6) if float(lat[:, p, j].max()) > 1e-3]
    assert len(table) == 3 * len(pairs) and (1, 2) not in pairs
    means = {}
    for p, j in pairs:
        col = lat[:, p, j].double()
        means[(p, j)] = float((col / col.sum() * torch.arange(3)).sum())
        rows = table[(table.position == p) & (table.latent == j)]
        assert list(rows.layer) == [4, 5, 6] and set(rows.token) == {"abcd"[p]}
        np.testing.assert_allclose(rows.act.to_numpy(), col.numpy(), rtol=1e-12)
    ranked = table.loc[table["layer"] == 4].sort_values(by="rank")
    got = [means[(int(p), int(j))] for p, j in zip(ranked.position, ranked.latent, strict=True)]
    assert got == sorted(got, reverse=True) and list(ranked["rank"]) == list(range(len(pairs)))
