"""saeflow.figures.mlsae: the dists heatmap's table is the layer distributions, sorted."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from saeflow.figures.mlsae import main


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
        assert abs(float(rows["prob"].sum()) - 1.0) < 1e-9
    first = table[table.layer == 0].set_index("rank").sort_index()
    assert first["layer_mean"].is_monotonic_increasing
    assert int(first["latent"].iloc[-1]) == 7 and float(first["layer_mean"].iloc[-1]) == 4.0
    assert (tmp_path / "t.pdf").read_bytes().startswith(b"%PDF")
