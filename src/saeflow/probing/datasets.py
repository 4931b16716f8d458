"""Stage: the probing datasets, read straight from the ``sae-probes`` wheel's bundled files.

``python -m saeflow.probing.datasets table --out tables/probing_datasets.csv [--custom NAME=CSV ...]``

The wheel ships ``sae_probes/data/cleaned_data/{num}_{tag}.csv.zst`` (columns ``prompt, target``
and sometimes ``prompt_len``), the MASTER table and ``data/OOD data/{name}_OOD.csv.zst``. Its own
``generate_dataset_activations`` globs ``*.csv`` and finds none of them (reference B1), so the
files are located with :mod:`importlib.util` (without importing the package, which takes 12 s)
and decompressed by pandas' zstd support. Labels are encoded as the original does
(``LabelEncoder``: sorted unique values -> 0, 1).
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from saeflow.h5io import InputFileError, atomic_path

# The 8 OOD sets of the paper (reference B1); the wheel's 9th file is a translation table.
OOD_DATASETS = (
    "5_hist_fig_ismale", "6_hist_fig_isamerican", "7_hist_fig_ispolitician", "66_living-room",
    "67_social-security", "73_control-group", "87_glue_cola", "90_glue_qnli",
)  # fmt: skip


class Dataset(NamedTuple):
    """One binary probing dataset."""

    prompts: list[str]
    """The prompts, in file order."""
    y: np.ndarray
    """int64 [n] labels in {0, 1}."""


@cache
def data_dir() -> Path:
    """The installed ``sae_probes/data`` folder."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'sae-probes' is not installed (pip install sae-probes==0.4.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (path / "probing_datasets_MASTER.csv.zst").exists():
        raise FileNotFoundError(f"{path}: no probing_datasets_MASTER.csv.zst; is sae-probes 0.4.2 installed?")
    return path


@cache
def binary_datasets() -> tuple[str, ...]:
    """The 113 binary-classification datasets of the MASTER table, ``{num}_{tag}``, in its order."""
    master = pd.read_csv(data_dir() / "probing_datasets_MASTER.csv.zst", compression="zstd")
    binary = master[master["Data type"] == "Binary Classification"]
    return tuple(Path(str(name)).stem for name in binary["Dataset save name"])


def _encode(frame: pd.DataFrame, path: Path) -> Dataset:
    missing = {"prompt", "target"} - set(frame.columns)
    if missing:
        raise InputFileError(f"{path}: columns {sorted(missing)} missing; expected prompt,target")
    frame = frame.dropna(subset=["prompt", "target"])
    classes = np.unique(frame["target"].to_numpy())
    if len(classes) != 2:
        raise InputFileError(f"{path}: column 'target' has {len(classes)} distinct values "
                             f"({list(classes[:5])}); a binary dataset needs exactly 2")
    y = np.searchsorted(classes, frame["target"].to_numpy()).astype(np.int64)
    return Dataset([str(p) for p in frame["prompt"]], y)


def read_csv(path: str | Path) -> Dataset:
    """A ``prompt,target`` CSV (optionally ``.zst``); any two target values, in any balance."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: dataset file not found")
    compression = "zstd" if path.suffix == ".zst" else "infer"
    return _encode(pd.read_csv(path, compression=compression), path)


def dataset_path(name: str, ood: bool = False) -> Path:
    """The bundled file of dataset ``name`` (``{num}_{tag}``), or of its OOD set."""
    if ood:
        if name not in OOD_DATASETS:
            raise KeyError(f"'{name}' has no OOD set; OOD sets: {', '.join(OOD_DATASETS)}")
        return data_dir() / "OOD data" / f"{name}_OOD.csv.zst"
    if name not in binary_datasets():
        raise KeyError(f"'{name}' is not one of the {len(binary_datasets())} binary datasets "
                       f"of sae-probes (e.g. {binary_datasets()[0]})")
    return data_dir() / "cleaned_data" / f"{name}.csv.zst"


def load(name: str, custom: dict[str, str] | None = None, ood: bool = False,
         max_rows: int | None = None) -> Dataset:
    """Dataset ``name``: a custom CSV if ``custom`` names it, else the bundled file.

    ``max_rows`` keeps the first rows, as the original's ``MAX_AMT`` does.
    """
    custom = custom or {}
    data = read_csv(custom[name]) if name in custom and not ood else read_csv(dataset_path(name, ood))
    if max_rows is not None:
        data = Dataset(data.prompts[:max_rows], data.y[:max_rows])
    return data


def table(names: Sequence[str], custom: dict[str, str] | None = None,
          max_rows: int | None = None) -> pd.DataFrame:
    """One row per dataset: ``dataset, source, n, n_pos, pos_frac, n_used`` (Table 4's list)."""
    rows = []
    for name in names:
        data = load(name, custom)
        used = len(data.y) if max_rows is None else min(max_rows, len(data.y))
        rows.append({"dataset": name, "source": "custom" if name in (custom or {}) else "sae_probes",
                     "n": len(data.y), "n_pos": int(data.y.sum()),
                     "pos_frac": round(float(data.y.mean()), 4), "n_used": used,
                     "has_ood": name in OOD_DATASETS})
    return pd.DataFrame(rows)


def parse_custom(items: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs as a dict."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--custom {item!r}: expected NAME=PATH")
        out[name] = path
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saeflow.probing.datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["table"])
    parser.add_argument("--dataset", action="append", default=[], help="dataset name (repeat)")
    parser.add_argument("--custom", action="append", default=[], help="NAME=PATH of a prompt,target CSV")
    parser.add_argument("--max-rows", type=int, default=None, help="rows used per dataset")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    frame = table(args.dataset, parse_custom(args.custom), args.max_rows)
    with atomic_path(args.out) as tmp:
        frame.to_csv(tmp, index=False)


if __name__ == "__main__":
    main()
