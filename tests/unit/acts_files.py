"""Activation files for unit tests, in the layout the caching stage writes (only what the readers
check). Imported by test modules as a sibling module, like pg_server and chat_server."""

from __future__ import annotations

from pathlib import Path

import h5py
from torch import Tensor

from saeflow.h5io import mark_complete, write_attrs


def write_acts(path: Path, acts: Tensor, chunk_tokens: int) -> Path:
    """``acts`` [n, d] as dataset ``acts`` chunked along tokens, marked complete."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("acts", data=acts.numpy(), chunks=(chunk_tokens, acts.shape[1]))
        write_attrs(h5, {"model": "toy", "corpus": "toy", "site": "toy"})
        mark_complete(h5)
    return path
