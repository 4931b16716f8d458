"""Stage: import a pretrained MLSAE (``tim-lawson/mlsae-{model}-x{R}-k{k}`` on the hub, or a
local folder in the original's layout) into saeflow's two-layout folder.

``python -m saeflow.mlsae.pretrained --repo tim-lawson/mlsae-pythia-70m-deduped-x64-k32 --out DIR``
``python -m saeflow.mlsae.pretrained --path LOCAL_ORIGINAL_FOLDER --out DIR``

The original's repositories are ``PyTorchModelHubMixin`` folders (``config.json`` +
``model.safetensors``); the ``-tfm`` ones (autoencoder inside a Lightning module) are not read.
Downloading needs the hub: with ``HF_HUB_OFFLINE`` set the stage stops before any work.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from saeflow.h5io import InputFileError
from saeflow.mlsae.trainer import MLSAETrainConfig, load_original, save_mlsae
from saeflow.saes import ImportSAEError, hub_offline


def convert_original(src: str | Path, out: str | Path, source: str) -> Path:
    """Write ``out`` (both layouts) from an original-layout folder ``src``."""
    sae = load_original(src)
    d_sae, d_in = sae.params.W_dec.shape
    cfg = MLSAETrainConfig(d_in=d_in, d_sae=d_sae, k=sae.k, layers=sae.layers, total_tokens=1,
                           standardise=sae.standardise, dataset=source)
    return save_mlsae(out, sae.params, cfg, {"imported_from": source})


def download(repo: str, dest: Path) -> Path:
    """The repository's ``config.json`` and ``model.safetensors`` in ``dest`` (needs the hub)."""
    if hub_offline():
        raise ImportSAEError(f"MLSAE repository {repo!r} needs the Hugging Face hub, but "
                             "HF_HUB_OFFLINE is set; download it elsewhere and import it with "
                             "--path")
    from huggingface_hub import hf_hub_download

    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_hub_download(repo, name), dest / name)
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saeflow.mlsae.pretrained",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo", help="hub repository of the original's layout")
    source.add_argument("--path", help="local folder in the original's layout")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.path:
        if not Path(args.path).is_dir():
            raise InputFileError(f"--path {args.path}: no such folder")
        convert_original(args.path, args.out, str(args.path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        convert_original(download(args.repo, Path(tmp)), args.out, f"hf://{args.repo}")


if __name__ == "__main__":
    main()
