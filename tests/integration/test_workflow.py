"""Real snakemake, end to end, on config/test.yaml from an empty results directory.

The run is ``clean_run`` (tests/integration/conftest.py), shared with the staleness, interruption
and SLURM tests, so CI builds the test config from scratch once.
"""

import json
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from sae_lens import SAE

from saeflow import h5io
from saeflow.config import sae_table
from saeflow.results import load_acts, load_sae_info

REPO = Path(__file__).resolve().parents[2]
TEST_CONFIG = yaml.safe_load((REPO / "config/test.yaml").read_text())

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(clean_run: Path) -> Path:
    return clean_run


def test_every_sae_beats_the_mean_and_helps_the_model(results):
    table = pd.read_csv(results / "tables/sae_metrics.csv")
    family_saes = sorted(
        i for i, sae in sae_table(TEST_CONFIG).items()
        if sae.get("family") in TEST_CONFIG["sae_families"]
    )
    assert {"resid2_relu-w1152-l1_2", "resid2_topk-w1152-k8", "resid2_topk-w288-k16"} <= set(
        family_saes
    )
    assert set(family_saes) <= set(table.sae_id)
    table = table[table.sae_id.isin(family_saes)]
    assert (table.fvu < 1).all() and (table.fvu > 0).all()
    # Splicing a residual-stream SAE in must beat zero-ablating the residual stream. For an
    # attention or MLP output, zero-ablation removes one layer's small update and can cost less
    # than a 30k-token SAE's reconstruction (the test config's mlp2 SAE: CE score -1.2).
    resid = table.loc[table.site.str.endswith("hook_resid_post")]
    assert len(resid) >= 7
    assert (resid.ce_loss_score > 0).all()
    assert (resid.ce_sae < resid.ce_ablated).all()
    topk = table.set_index("sae_id")
    # a TopK SAE's L0 is exactly its k (ties aside), and more latents reconstruct better
    assert topk.loc["resid2_topk-w1152-k8", "mean_l0"] == pytest.approx(8, abs=0.05)
    assert topk.loc["resid2_topk-w1152-k16", "fvu"] < topk.loc["resid2_topk-w1152-k8", "fvu"]


def test_outputs_have_consistent_shapes(results):
    corpus = TEST_CONFIG["corpora"]["news_eval"]
    n_tokens = corpus["n_seq"] * (corpus["ctx_len"] - 1)
    with load_acts(results / "acts/smollm2/news_eval/blocks.2.hook_resid_post.h5") as acts, \
            load_sae_info(results / "sae_eval/resid2_topk-w1152-k8/news_eval.h5") as info:
        assert acts.acts.shape == (n_tokens, 576)
        assert info.error.shape == (n_tokens, 576)
        assert info.l0.shape == info.act_norm.shape == (n_tokens,)
        assert info.latent_ptr[-1] == len(info.latent_idx) == int(info.l0[:].sum())
        x = torch.from_numpy(acts.acts[:50])
        sae = SAE.load_from_disk(str(results / "saes/resid2_topk-w1152-k8"))
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(info.error[:50]), sae(x) - x)
            torch.testing.assert_close(info.latents(slice(0, 50)), sae.encode(x))
        assert torch.allclose(torch.from_numpy(info.act_norm[:50]), x.norm(dim=-1))
    with h5io.H5File(results / "acts/smollm2/news_eval/lm_loss.h5") as loss:
        assert loss["loss"].shape == (corpus["n_seq"], corpus["ctx_len"] - 1)
        assert 2.0 < loss["loss"][:].mean() < 6.0  # SmolLM2 on news text: ~3.5 nats


def test_metrics_record_provenance(results):
    metrics = json.loads((results / "sae_eval/resid2_topk-w1152-k8/news_eval.metrics.json").read_text())
    assert metrics["site"] == "blocks.2.hook_resid_post"
    assert 0 <= metrics["dead_fraction"] <= 1
    assert metrics["downstream_tokens"] == 4 * (64 - 2)


def test_dry_run_after_a_complete_run_has_nothing_to_do(results, snakemake):
    run = snakemake(results, "-n")
    assert run.returncode == 0, run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr


def test_dark_matter_tables_and_plots(results):
    family = TEST_CONFIG["sae_families"][TEST_CONFIG["dark_matter"]["family"]]
    grid = sorted((w, k) for w in family["widths"] for k in family["k"])
    saes = pd.read_csv(results / "tables/dark_matter_saes.csv")
    assert sorted(zip(saes.width, saes.k)) == grid
    assert ((saes.fvu_pursuit > 0) & (saes.fvu_pursuit < 1)).all()
    assert (saes.pursuit_rows == saes.n_tokens).all()  # pursuit_tokens covers the test corpus
    fits = pd.read_csv(results / "tables/dark_matter_power_laws.csv")
    assert len(fits) == 3 * len(family["k"]) and fits.loc[:, ["a", "m", "c"]].notna().all().all()
    fig1 = pd.read_csv(results / "tables/figure1.csv")
    assert set(fig1.k) == {16} and sorted(fig1[fig1.measured].width) == family["widths"]
    bands = ["absent_features", "linear_error", "encoder_error", "nonlinear_error"]
    assert fig1[bands].sum(axis=1).to_numpy() == pytest.approx(fig1.total_fvu.to_numpy())
    fig2 = pd.read_csv(results / "tables/figure2.csv")
    assert (fig2.kind == "measured").sum() == 2 * len(grid)
    for n in (3, 4):
        assert len(pd.read_csv(results / f"tables/figure{n}.csv")) == len(grid)
    for n in (1, 2, 3, 4):
        assert (results / f"plots/figure{n}.pdf").read_bytes().startswith(b"%PDF")


def test_the_report_gathers_every_figure_with_its_caption(results, snakemake, tmp_path):
    """`snakemake --report` finds each plot and dashboard through its rule's report() flag."""
    report = tmp_path / "report.zip"
    run = snakemake(results, "--report", str(report))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = sorted(
        p.relative_to(results).as_posix()
        for p in [*results.glob("plots/**/*.pdf"), *results.glob("plots/dashboards/*/index.html")]
    )
    assert "plots/figure8.pdf" in figures and "plots/toy_recovery.pdf" in figures
    with zipfile.ZipFile(report) as archive:
        names = archive.namelist()
        html = archive.read("report/report.html").decode("utf-8")
    # the report keeps each file's name under report/data/raw/<hash>/ (dashboards: index.html)
    missing = Counter(Path(f).name for f in figures) - Counter(Path(n).name for n in names)
    assert not missing, f"not in the report: {sorted(missing)}"
    assert "Decomposing the Dark Matter" in html and "balanced accuracy" in html
