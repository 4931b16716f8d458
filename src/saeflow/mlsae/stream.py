"""MLSAE training batches computed on the fly, from one forward pass per group of sequences.

All layers of all training tokens do not fit on disk at scale (Pythia-160m: 12 layers x 768
floats x 4 bytes = 37 KB per token, 37 GB per million tokens), so the original trains on
activations it computes as it goes. :class:`ModelLayerBatches` does the same with the spine's
capture (:func:`saeflow.activations.capture_batch`, which stops after the last layer read):

- each epoch visits the sequences of the tokens file in a seeded order, ``seqs_per_pass`` at a
  time; one forward pass gives ``hook_resid_post`` of every layer for those sequences;
- the pass's tokens (positions >= ``skip``) are shuffled with a seed of (seed, epoch, pass), the
  same permutation for every layer, so row i of every layer is the same token;
- batches of ``batch_size`` rows are cut from the concatenation of the passes.

The position in that stream is one integer (rows consumed). A resumed run recomputes the pass it
stopped in; the forward pass is deterministic on the CPU for a fixed thread count, so the batches,
and the trained weights, equal those of an uninterrupted run. It has :class:`LayerBatches`'s
interface (``next``, ``state_dict``, ``load_state_dict``, ``close``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from nnsight import NNsight
from torch import Tensor
from transformers import PreTrainedModel

from saeflow.activations import capture_batch
from saeflow.models import resolve_site


class ModelLayerBatches:
    """(L, B, d) batches of ``blocks.{layer}.hook_resid_post`` for ``layers``, from ``model``
    run on ``tokens`` [n_seq, ctx] as the module docstring describes."""

    def __init__(self, model: PreTrainedModel, tokens: np.ndarray, layers: list[int],
                 batch_size: int, seed: int, seqs_per_pass: int, skip: int) -> None:
        n_seq, ctx = tokens.shape
        if not 0 <= skip < ctx:
            raise ValueError(f"skip_positions={skip} must be in [0, ctx_len={ctx})")
        if seqs_per_pass < 1:
            raise ValueError(f"seqs_per_pass={seqs_per_pass} must be at least 1")
        self.sites = [f"blocks.{layer}.hook_resid_post" for layer in layers]
        for site in self.sites:
            resolve_site(model, site)  # a bad layer fails before any forward pass
        self.model, self.traced = model, NNsight(model)
        self.tokens, self.batch_size, self.seed = tokens, batch_size, seed
        self.seqs_per_pass, self.skip = seqs_per_pass, skip
        self.kept = ctx - skip
        self.n_tokens = n_seq * self.kept  # rows per epoch
        self.rows_done = 0
        self._cached: tuple[tuple[int, int], Tensor] | None = None

    def __next__(self) -> Tensor:
        parts, need = [], self.batch_size
        while need:
            epoch, within = divmod(self.rows_done, self.n_tokens)
            pass_index, cursor = divmod(within, self.seqs_per_pass * self.kept)
            rows = self._pass(epoch, pass_index)
            take = min(need, rows.shape[1] - cursor)
            parts.append(rows[:, cursor : cursor + take])
            self.rows_done += take
            need -= take
        return torch.cat(parts, dim=1)

    def _pass(self, epoch: int, pass_index: int) -> Tensor:
        """[L, rows, d] activations of one pass, shuffled (kept until the next pass starts)."""
        key = (epoch, pass_index)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.tokens))
        seqs = np.sort(order[pass_index * self.seqs_per_pass : (pass_index + 1) * self.seqs_per_pass])
        ids = torch.from_numpy(self.tokens[seqs].astype(np.int64)).to(self.model.device)
        with torch.inference_mode():
            acts = capture_batch(self.traced, self.model, ids, self.sites)
        rows = torch.stack([acts[s][:, self.skip :].reshape(-1, acts[s].shape[-1]).float()
                            for s in self.sites])
        perm = np.random.default_rng([self.seed, epoch, pass_index]).permutation(rows.shape[1])
        rows = rows[:, torch.from_numpy(perm)].cpu()
        self._cached = (key, rows)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"rows_done": self.rows_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows_done = int(state["rows_done"])

    def close(self) -> None:
        self._cached = None
