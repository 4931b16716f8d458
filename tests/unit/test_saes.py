"""SAE training (SAELens architectures and the topk dispatch), SAE folders, import and families."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from sae_lens import SAE

from saeflow import sae_lens_train, saes, train
from saeflow.h5io import InputFileError, atomic_path, mark_complete, write_attrs
from saeflow.sae_lens_train import (
    SAELensTrainConfig,
    build_training_sae,
    to_inference_sae,
    train_sae_lens,
)

D_IN, N_TRUE, N_TOKENS = 16, 48, 8192
SITE = "blocks.0.hook_resid_post"
ARCHS = ("batchtopk", "standard", "jumprelu", "gated")
# Per-architecture sparsity settings that reach L0 of about 4-8 in 300 steps on the toy data
# (about 3 true features per token); measured MSE ratios are 0.09-0.14.
SPARSITY: dict[str, dict[str, Any]] = {
    "batchtopk": {"k": 4},
    "standard": {"l1_coefficient": 0.5},
    "jumprelu": {"l0_coefficient": 0.1, "sae_options": {"jumprelu_init_threshold": 0.05}},
    "gated": {"l1_coefficient": 1.0},
}


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# tiny shapes run 10-30x slower on two threads of a busy 2-core machine (measured)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_sparse_acts(path: Path, seed: int = 0) -> torch.Tensor:
    """Activations that are sparse sums of N_TRUE random unit directions, in saeflow's layout."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(N_TRUE, D_IN, generator=gen), dim=-1)
    active = torch.rand(N_TOKENS, N_TRUE, generator=gen) < 3 / N_TRUE
    coefs = active * (0.5 + torch.rand(N_TOKENS, N_TRUE, generator=gen))
    acts = (coefs @ dictionary + 0.01 * torch.randn(N_TOKENS, D_IN, generator=gen)).float()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("acts", data=acts.numpy(), chunks=(1024, D_IN))
        h5.create_dataset("tokens", data=np.zeros(N_TOKENS, dtype=np.int32))
        write_attrs(
            h5,
            {
                "model": "toy-model",
                "corpus": "toy-corpus",
                "site": SITE,
                "d_model": D_IN,
                "n_seq": N_TOKENS // 64,
                "ctx_len": 64,
                "skip_positions": 0,
            },
        )
        mark_complete(h5)
    return acts


@pytest.fixture(scope="module")
def acts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("acts") / f"{SITE}.h5"
    make_sparse_acts(path)
    return path


def config(arch: str, **overrides: Any) -> SAELensTrainConfig:
    kwargs: dict[str, Any] = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": 64,
        "batch_size": 256,
        "total_tokens": 256 * 300,
        "seed": 3,
        "lr": 1e-2,
        "lr_warmup_steps": 10,
        "checkpoint_every_steps": 80,
        "buffer_tokens": 2048,
        "hook_name": SITE,
        "model_name": "toy-model",
        "dataset": "toy-corpus",
    }
    return SAELensTrainConfig(**{**kwargs, **SPARSITY[arch], **overrides})


@pytest.fixture(scope="module")
def trained(acts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted run per architecture, shared by the tests below."""
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp(arch)
        train_sae_lens(acts_file, root / "sae", config(arch), root / "ckpt", progress=False)
        out[arch] = root / "sae"
    return out


def eval_acts(acts_file: Path) -> torch.Tensor:
    with h5py.File(acts_file) as h5:
        acts = h5["acts"]
        assert isinstance(acts, h5py.Dataset)
        return torch.from_numpy(acts[:2048])


def mse(sae: SAE[Any], x: torch.Tensor) -> float:
    with torch.no_grad():
        return (sae.decode(sae.encode(x)) - x).pow(2).sum(-1).mean().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_reconstruction_error(
    arch: str, trained: dict[str, Path], acts_file: Path
) -> None:
    x = eval_acts(acts_file)
    initial = to_inference_sae(build_training_sae(config(arch)))
    final = SAE.load_from_disk(trained[arch])
    assert mse(final, x) < 0.25 * mse(initial, x)
    with torch.no_grad():
        l0 = (final.encode(x) > 0).float().sum(-1).mean().item()
    assert 1 < l0 < 12, f"{arch}: L0 {l0} of 64 latents is not sparse"


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_matches_in_memory_model(arch: str, acts_file: Path, tmp_path: Path) -> None:
    cfg = config(arch, total_tokens=256 * 30)
    with sae_lens_train._batches(acts_file, cfg, cfg.seed) as batches:
        state = sae_lens_train.fit(cfg, batches, tmp_path / "ckpt", progress=False)
    state.sae.save_inference_model(tmp_path / "sae")
    loaded = saes.load_sae(tmp_path / "sae")
    x = eval_acts(acts_file)
    with torch.no_grad():
        expected = to_inference_sae(state.sae).encode(x)
        torch.testing.assert_close(loaded.encode(x), expected, rtol=0, atol=0)
        if arch != "batchtopk":  # BatchTopK's training activation depends on the whole batch
            torch.testing.assert_close(loaded.encode(x), state.sae.encode(x), rtol=1e-6, atol=1e-6)
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["model_name"], meta["dataset_path"]) == (
        SITE,
        "toy-model",
        "toy-corpus",
    )
    assert meta["saeflow_training"]["architecture"] == arch


@pytest.mark.parametrize("arch", ["batchtopk", "gated"])
def test_activation_normalisation_is_folded_into_the_weights(
    arch: str, acts_file: Path, tmp_path: Path
) -> None:
    cfg = config(arch, total_tokens=256 * 20, normalize_activations="expected_average_only_in")
    with (
        sae_lens_train._batches(acts_file, cfg, cfg.seed) as batches,
        sae_lens_train._batches(acts_file, cfg, cfg.seed + 1) as norm_batches,
    ):
        state = sae_lens_train.fit(cfg, batches, tmp_path / "ckpt", norm_batches, progress=False)
    scale = state.scaling_factor
    assert scale is not None and scale > 0
    x = eval_acts(acts_file)
    with torch.no_grad():
        model = to_inference_sae(state.sae)
        expected_acts, expected_out = model.encode(x * scale), model(x * scale) / scale
        if arch == "batchtopk":  # latents in units of the decoder norm shrink with the inputs
            expected_acts = expected_acts / scale
        sae_lens_train.finalize(state, cfg, None)
        folded = to_inference_sae(state.sae)
        torch.testing.assert_close(folded.encode(x), expected_acts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded(x), expected_out, rtol=1e-4, atol=1e-5)
    assert folded.cfg.normalize_activations == "none"


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_matches_uninterrupted_run(
    arch: str,
    trained: dict[str, Path],
    acts_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_step, calls = sae_lens_train.train_step, []

    def crashing_step(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 95:  # after the step-80 checkpoint, before the next one
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sae_lens_train, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_sae_lens(acts_file, tmp_path / "sae", config(arch), tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "sae").exists() and (tmp_path / "ckpt" / "checkpoint.pt").exists()
    monkeypatch.setattr(sae_lens_train, "train_step", real_step)
    train_sae_lens(acts_file, tmp_path / "sae", config(arch), tmp_path / "ckpt", progress=False)
    resumed, reference = SAE.load_from_disk(tmp_path / "sae"), SAE.load_from_disk(trained[arch])
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    log = (tmp_path / "sae" / "train_log.csv").read_text().splitlines()
    assert log == (trained[arch] / "train_log.csv").read_text().splitlines()


def test_expand_family_topk_ids_and_params() -> None:
    family = {
        "model": "smollm2",
        "corpus": "news",
        "site": "blocks.3.hook_resid_post",
        "architecture": "topk",
        "widths": [1152, 2304],
        "k": [16, 32],
        "lr": None,
        "tokens": 1_000_000,
        "batch_size": 4096,
        "seed": 0,
        "checkpoint_every": 200,
    }
    members = saes.expand_family("res3", family)
    assert list(members) == ["res3-w1152-k16", "res3-w1152-k32", "res3-w2304-k16", "res3-w2304-k32"]
    assert members["res3-w2304-k16"] == {
        "family": "res3",
        "architecture": "topk",
        "d_sae": 2304,
        "k": 16,
        "model": "smollm2",
        "corpus": "news",
        "site": "blocks.3.hook_resid_post",
        "lr": None,
        "tokens": 1_000_000,
        "batch_size": 4096,
        "seed": 0,
        "checkpoint_every": 200,
    }


def test_expand_family_coefficients_and_expansion_factors() -> None:
    standard = {"architecture": "standard", "widths": [64], "l1_coefficient": [5, 0.0001, 2.5]}
    assert list(saes.expand_family("l1", standard)) == [
        "l1-w64-l1_5",
        "l1-w64-l1_0.0001",
        "l1-w64-l1_2.5",
    ]
    jumprelu = {
        "architecture": "jumprelu",
        "expansion_factors": [4, 8],
        "l0_coefficient": 0.5,
        "jumprelu_init_threshold": 0.001,
        "jumprelu_bandwidth": 0.01,
    }
    members = saes.expand_family("jr", jumprelu, d_in=576)
    assert list(members) == ["jr-w2304-l0_0.5", "jr-w4608-l0_0.5"]
    assert members["jr-w4608-l0_0.5"] == {
        "family": "jr",
        "architecture": "jumprelu",
        "d_sae": 4608,
        "l0_coefficient": 0.5,
        "jumprelu_init_threshold": 0.001,
        "jumprelu_bandwidth": 0.01,
    }
    # Without d_in (the config cannot know it before the model is read) the factor stays symbolic.
    unsized = saes.expand_family("jr", {**jumprelu, "expansion_factors": [2.5]})
    assert unsized == {
        "jr-x2.5-l0_0.5": {
            "family": "jr",
            "architecture": "jumprelu",
            "expansion_factor": 2.5,
            "l0_coefficient": 0.5,
            "jumprelu_init_threshold": 0.001,
            "jumprelu_bandwidth": 0.01,
        }
    }


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ({"architecture": "standard", "widths": [8], "k": [4]}, "'k' is not valid"),
        ({"architecture": "topk", "widths": [8], "k": [4], "normalize_activations": "none"},
         "'normalize_activations' is not valid for architecture 'topk'"),
        ({"architecture": "topk", "widths": [8]}, "needs 'k'"),
        ({"architecture": "topk", "k": [4]}, "exactly one of 'widths'"),
        ({"architecture": "topk", "widths": [8], "k": [2.5]}, "positive integers"),
        ({"architecture": "standard", "widths": [8], "l1_coefficient": [-1]}, "non-negative"),
        ({"architecture": "topk", "widths": [8], "k": [4], "lr": [1e-3, 1e-4]}, "single value"),
        ({"architecture": "topk", "widths": [8], "k": [4, 4]}, "declared twice"),
        ({"architecture": "relu", "widths": [8], "k": [4]}, "architecture 'relu'"),
    ],
)
def test_expand_family_rejects_bad_declarations(family: dict[str, Any], message: str) -> None:
    with pytest.raises(saes.FamilyError, match=message):
        saes.expand_family("fam", family, d_in=16)
    with pytest.raises(saes.FamilyError, match="family name"):
        saes.expand_family("bad name", {"architecture": "topk", "widths": [8], "k": [4]})


def test_import_path_round_trip(trained: dict[str, Path], tmp_path: Path, acts_file: Path) -> None:
    saes.main(["import", "--out", str(tmp_path / "copy"), "--path", str(trained["gated"])])
    original, copy = saes.load_sae(trained["gated"]), saes.load_sae(tmp_path / "copy")
    assert type(copy) is type(original) and copy.cfg.to_dict() == original.cfg.to_dict()
    x = eval_acts(acts_file)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), original(x), rtol=0, atol=0)


def test_import_rejects_bad_folder_and_offline_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="cfg.json missing"):
        saes.load_sae(tmp_path / "empty")
    with pytest.raises(SystemExit, match="empty"):
        saes.main(["import", "--out", str(tmp_path / "x"), "--path", str(tmp_path / "empty")])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="needs the Hugging Face hub"):
        saes.main(
            [
                "import",
                "--out",
                str(tmp_path / "x"),
                "--release",
                "gpt2-small-res-jb",
                "--sae-id",
                "blocks.0.hook_resid_pre",
            ]
        )
    assert not (tmp_path / "x").exists()


def cli(acts: Path, tmp_path: Path, *extra: str, width: str = "--d-sae 32") -> list[str]:
    common = f"--batch-size 256 --tokens 2560 --seed 0 --threads 1 --no-progress {width}".split()
    paths = ["--acts", str(acts), "--out", str(tmp_path / "sae")]
    return [*paths, "--checkpoint-dir", str(tmp_path / "ckpt"), *common, *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--architecture", "topk"], "requires --k"),
        (["--architecture", "standard"], "requires --l1-coefficient"),
        (["--architecture", "standard", "--l1-coefficient", "1", "--k", "4"], "--k does not apply"),
        (
            ["--architecture", "jumprelu", "--l0-coefficient", "1", "--l1-coefficient", "1"],
            "--l1-coefficient does not apply",
        ),
        (
            ["--architecture", "batchtopk", "--k", "4", "--auxk-coef", "1"],
            "--auxk-coef does not apply",
        ),
        (["--architecture", "topk", "--k", "2.5"], "--k must be a whole number"),
        (["--architecture", "gated", "--l1-coefficient", "-1"], "--l1-coefficient"),
    ],
)
def test_train_cli_rejects_bad_combinations(
    extra: list[str],
    message: str,
    acts_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(cli(acts_file, tmp_path, *extra))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_train_cli_names_a_bad_acts_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.h5"
    with pytest.raises(SystemExit, match="nope.h5: file not found"):
        train.main(cli(missing, tmp_path, "--architecture", "batchtopk", "--k", "4"))


@pytest.mark.parametrize(
    ("arch", "extra", "width"),
    [
        ("topk", ["--k", "4"], "--d-sae 32"),
        ("jumprelu", ["--l0-coefficient", "0.01"], "--expansion-factor 2"),
    ],
)
def test_train_cli_dispatch_writes_loadable_sae(
    arch: str, extra: list[str], width: str, acts_file: Path, tmp_path: Path
) -> None:
    # as the train_sae rule calls it: --device auto, for every architecture
    train.main(cli(acts_file, tmp_path, "--architecture", arch, *extra, "--device", "auto",
                   width=width))
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, 32)
    assert sae.cfg.metadata.hook_name == SITE  # taken from the acts file's 'site' attribute
    with torch.no_grad():
        assert sae.encode(eval_acts(acts_file)[:8]).shape == (8, 32)


def test_layout_file_names_match_sae_lens() -> None:
    """saeflow.saes spells SAELens's file names out (to import fast); they must stay in step."""
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    assert saes.SAE_CFG_FILENAME == SAE_CFG_FILENAME
    assert saes.SAE_WEIGHTS_FILENAME == SAE_WEIGHTS_FILENAME


def test_config_import_is_light() -> None:
    """The Snakefile imports saeflow.config on every snakemake start (the SLURM executor
    starts one per job); it must not pull in torch, transformers or sae_lens (seconds each)."""
    code = (
        "import sys, saeflow.config\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'sae_lens') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
