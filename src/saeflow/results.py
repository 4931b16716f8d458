"""Load what the workflow produced, from Python.

>>> from saeflow.results import load_acts, load_sae_info, load_metrics
>>> acts = load_acts("results/acts/smollm2/news_eval/blocks.6.hook_resid_post.h5")
>>> info = load_sae_info("results/sae_eval/resid6_topk-w2304-k32/news_eval.h5")
>>> info.error[:1000]              # Sae(x) - x for the first 1000 tokens, [1000, d]
>>> info.latents(slice(0, 1000))   # dense latent activations, [1000, d_sae]
>>> info.active(7)                 # (latent ids, values) active on token 7
>>> load_metrics("results/sae_eval/resid6_topk-w2304-k32/news_eval.metrics.json")["fvu"]

Arrays are read lazily from HDF5 (index them to load); call ``close()`` or use ``with``.
File layouts are documented in :mod:`saeflow.h5io` and :mod:`saeflow.sae_eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saeflow import h5io


class _H5View:
    """Attribute access to an HDF5 file's datasets and attributes."""

    def __init__(self, h5: h5io.H5File) -> None:
        self.h5 = h5
        self.attrs = {key: h5io.plain(value) for key, value in h5.attrs.items()}

    def __getattr__(self, name: str) -> h5py.Dataset:
        if name != "h5" and name in self.h5:
            return self.h5[name]
        raise AttributeError(f"{self.h5.filename} has no dataset '{name}'")

    def close(self) -> None:
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Activations(_H5View):
    """``acts`` [n, d] and ``tokens`` [n] of one site, plus provenance in ``attrs``."""

    def position(self, row: int) -> tuple[int, int]:
        """(sequence, position) of a row."""
        kept = self.attrs["ctx_len"] - self.attrs["skip_positions"]
        return row // kept, self.attrs["skip_positions"] + row % kept


class SAEInfo(_H5View):
    """One SAE on one corpus: the Dark Matter SAEInfoObject, read lazily from disk.

    Datasets: ``error`` (Sae(x) - x), ``error_sq_norm``, ``l0``, ``act_norm``, ``tokens``,
    ``latent_freq``, ``latent_mean_act`` and the CSR triple ``latent_ptr/idx/val``.
    """

    def _need_latents(self) -> None:
        if "latent_ptr" not in self.h5:
            raise KeyError(f"{self.h5.filename}: no CSR latents stored "
                           f"({self.h5.attrs.get('latents_skipped_why', '')}; see "
                           "evaluation.csr_max_l0)")

    def active(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Latent ids and values active on one token."""
        self._need_latents()
        lo, hi = self.h5["latent_ptr"][row : row + 2]
        return self.h5["latent_idx"][lo:hi], self.h5["latent_val"][lo:hi]

    def latents(self, rows: slice) -> torch.Tensor:
        """Dense latent activations [n_rows, d_sae] for a contiguous slice of tokens."""
        self._need_latents()
        start, stop, _ = rows.indices(len(self.h5["l0"]))
        ptr = self.h5["latent_ptr"][start : stop + 1]
        idx = self.h5["latent_idx"][ptr[0] : ptr[-1]]
        val = self.h5["latent_val"][ptr[0] : ptr[-1]]
        row_ids = np.repeat(np.arange(stop - start), np.diff(ptr))
        dense = torch.zeros(stop - start, int(self.attrs["d_sae"]))
        dense[torch.from_numpy(row_ids), torch.from_numpy(idx.astype(np.int64))] = torch.from_numpy(val)
        return dense

    def reconstruction(self, acts: np.ndarray, rows: slice) -> np.ndarray:
        """Sae(x) for the given rows, from the cached activations and errors."""
        return acts[rows] + self.h5["error"][rows]


def load_acts(path: str | Path) -> Activations:
    return Activations(h5io.open_checked(path, datasets={"acts": (None, None), "tokens": (None,)}))


def load_sae_info(path: str | Path) -> SAEInfo:
    return SAEInfo(h5io.open_checked(path, datasets={"error": (None, None), "l0": (None,)}))


def load_metrics(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
