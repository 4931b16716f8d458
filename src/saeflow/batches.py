"""Seeded, resumable, memory-bounded batches of cached activations.

:class:`ActivationBatches` reads an ``acts/...h5`` file (see :mod:`saeflow.h5io`) and yields
float32 ``[batch_size, d]`` tensors forever, one epoch after another.

How an epoch is shuffled (the classic shuffle-buffer loader, as in SAELens's mixing buffer):

1. The token axis is cut into *blocks* of whole HDF5 chunks, so every read is contiguous and
   decompresses each chunk once.
2. The blocks are visited in a seeded random order, ``buffer_tokens`` worth at a time.
3. Each buffer-full is permuted (seeded) and served row by row.

The epoch is thus a permutation of all rows: every row is served exactly once per epoch. Batches
run straight across buffer and epoch boundaries, so a batch may hold the last rows of one epoch
and the first of the next. Memory is one buffer plus one batch.

Every permutation is a pure function of ``(seed, epoch, buffer index)``, so the stream position is
the only state: :meth:`ActivationBatches.state_dict` records how many batches were served, and
:meth:`ActivationBatches.load_state_dict` rebuilds exactly the batches an uninterrupted run would
have produced next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np
import torch
from torch import Tensor

from saeflow.h5io import open_checked

DEFAULT_BUFFER_TOKENS = 2**17
"""Default shuffle-buffer size in tokens (2**17 x 576 float32 = 302 MB for SmolLM2's residual)."""

_BLOCK_TOKENS = 4096
"""Blocks are whole chunks adding up to at least this many tokens (one seek per block)."""


class ActivationBatches:
    """Infinite, seeded, resumable iterator of float32 activation batches ``[batch_size, d]``.

    ``path`` is an activations file with dataset ``acts`` float32 ``[n_tokens, d]`` chunked along
    tokens; ``buffer_tokens`` bounds memory (rounded to whole blocks, at least one block).
    Use as a context manager, or call :meth:`close`, to release the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int,
        seed: int,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if buffer_tokens < 1:
            raise ValueError(f"buffer_tokens must be positive, got {buffer_tokens}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.seed = seed
        self._h5 = open_checked(self.path, {"acts": (None, None)})
        acts = self._h5["acts"]
        assert isinstance(acts, h5py.Dataset)  # open_checked checked its shape
        self._acts: h5py.Dataset = acts
        self.n_tokens, self.d = (int(n) for n in self._acts.shape)
        if self.n_tokens == 0:
            self._h5.close()
            raise ValueError(f"{self.path}: dataset 'acts' has no rows")
        chunk = self._acts.chunks[0] if self._acts.chunks else 1
        self.block_tokens = chunk * max(1, -(-_BLOCK_TOKENS // chunk))
        self.n_blocks = -(-self.n_tokens // self.block_tokens)
        self.blocks_per_buffer = min(self.n_blocks, max(1, buffer_tokens // self.block_tokens))
        self.buffer_tokens = buffer_tokens
        self._served = 0  # batches served so far
        self._plan_epoch = -1  # that epoch's block order and where each buffer starts
        self._block_order = np.empty(0, dtype=np.int64)
        self._buffer_starts = np.zeros(1, dtype=np.int64)
        self._loaded = (-1, -1)  # (epoch, buffer index) in self._rows, permuted by self._order
        self._rows = torch.empty(0, self.d)
        self._order = torch.empty(0, dtype=torch.int64)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        start, stop = self._served * self.batch_size, (self._served + 1) * self.batch_size
        pieces = []
        while start < stop:
            epoch, offset = divmod(start, self.n_tokens)
            self._plan(epoch)
            buffer_index = int(np.searchsorted(self._buffer_starts, offset, side="right")) - 1
            row = offset - int(self._buffer_starts[buffer_index])
            self._load(epoch, buffer_index)
            take = min(len(self._order) - row, stop - start)
            pieces.append(self._rows.index_select(0, self._order[row : row + take]))
            start += take
        self._served += 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    @property
    def epoch(self) -> int:
        """Epoch of the next row to be served (0-based)."""
        return self._served * self.batch_size // self.n_tokens

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Stream position plus the settings it is only valid for."""
        return {
            "batches_served": self._served,
            "epoch": self.epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_tokens": self.n_tokens,
            "block_tokens": self.block_tokens,
            "blocks_per_buffer": self.blocks_per_buffer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises ValueError if it came from a different stream."""
        for key in ("seed", "batch_size", "n_tokens", "block_tokens", "blocks_per_buffer"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"{self.path}: batches state has {key}={state.get(key)!r}, but this stream "
                    f"has {key}={getattr(self, key)!r}; it cannot be resumed"
                )
        self._served = int(state["batches_served"])

    # ------------------------------------------------------------------ reading
    def _plan(self, epoch: int) -> None:
        """The block order of ``epoch`` and the first row (in the epoch) of each buffer."""
        if epoch == self._plan_epoch:
            return
        self._block_order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        sizes = self._block_sizes(self._block_order)  # the short last block may land anywhere
        per_buffer = np.add.reduceat(sizes, np.arange(0, self.n_blocks, self.blocks_per_buffer))
        self._buffer_starts = np.concatenate([[0], np.cumsum(per_buffer)])
        self._plan_epoch = epoch

    def _block_sizes(self, blocks: np.ndarray) -> np.ndarray:
        return np.minimum(self.block_tokens, self.n_tokens - blocks * self.block_tokens)

    def _load(self, epoch: int, buffer_index: int) -> None:
        """Make buffer ``buffer_index`` of ``epoch`` the current one (read and permute)."""
        if (epoch, buffer_index) == self._loaded:
            return
        first = buffer_index * self.blocks_per_buffer
        blocks = np.sort(self._block_order[first : first + self.blocks_per_buffer])
        sizes = self._block_sizes(blocks)
        if self._rows.shape[0] != int(sizes.sum()):
            self._rows = torch.empty(int(sizes.sum()), self.d)
        rows = self._rows.numpy()
        at = 0
        for block, size in zip(blocks.tolist(), sizes.tolist()):  # sorted: sequential reads
            start = block * self.block_tokens
            self._acts.read_direct(rows, np.s_[start : start + size], np.s_[at : at + size])
            at += size
        rng = np.random.default_rng([self.seed, epoch, buffer_index])
        self._order = torch.from_numpy(rng.permutation(at))
        self._loaded = (epoch, buffer_index)

    def close(self) -> None:
        """Release the HDF5 file."""
        self._h5.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
