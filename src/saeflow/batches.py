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
        self._acts = self._h5["acts"]
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
        self._epoch = -1  # the loaded buffer: (epoch, index), rows and their permutation
        self._buffer_index = -1
        self._rows = torch.empty(0, self.d)
        self._order = torch.empty(0, dtype=torch.int64)
        self._block_order = np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        start = self._served * self.batch_size
        pieces = []
        while start < (self._served + 1) * self.batch_size:
            epoch, offset = divmod(start, self.n_tokens)
            buffer_index, row = divmod(offset, self.blocks_per_buffer * self.block_tokens)
            self._load(epoch, buffer_index)
            take = min(len(self._order) - row, (self._served + 1) * self.batch_size - start)
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
    def _load(self, epoch: int, buffer_index: int) -> None:
        """Make buffer ``buffer_index`` of ``epoch`` the current one (read and permute)."""
        if (epoch, buffer_index) == (self._epoch, self._buffer_index):
            return
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._block_order = rng.permutation(self.n_blocks)
        first = buffer_index * self.blocks_per_buffer
        blocks = np.sort(self._block_order[first : first + self.blocks_per_buffer])
        sizes = [min(self.block_tokens, self.n_tokens - b * self.block_tokens) for b in blocks]
        if self._rows.shape[0] != sum(sizes):
            self._rows = torch.empty(sum(sizes), self.d)
        rows = self._rows.numpy()
        at = 0
        for block, size in zip(blocks, sizes):  # sorted: sequential reads
            start = int(block) * self.block_tokens
            self._acts.read_direct(rows, np.s_[start : start + size], np.s_[at : at + size])
            at += size
        rng = np.random.default_rng([self.seed, epoch, buffer_index])
        self._order = torch.from_numpy(rng.permutation(at))
        self._epoch, self._buffer_index = epoch, buffer_index

    def close(self) -> None:
        """Release the HDF5 file."""
        self._h5.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
