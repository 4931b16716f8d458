"""An MLSAE on one prompt: the residual stream at every layer it reads, its codes, and the
prompt heatmap table (the original's ``figures/prompt_heatmaps.py``).

The heatmap has one column per (token, latent) pair whose largest activation over layers is
above ``threshold`` (the original's ``dead_threshold`` 1e-3), holding its activation at each
layer; columns are sorted by the pair's mean layer, descending, as the original's. Used by
:mod:`saeflow.figures.mlsae` (``prompt``) and by the viewer's MLSAE views.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saeflow.mlsae.math import dense_codes, reconstruct
from saeflow.mlsae.trainer import LoadedMLSAE

PAPER_PROMPT = "When Mary and John went to the store, John gave a drink to"
"""The prompt of the paper's heatmaps."""


def layer_residuals(model, ids: Tensor, layers: list[int]) -> Tensor:
    """``hook_resid_post`` of ``layers`` for token ids (1, T): float32 (L, T, d)."""
    from saeflow.models import resolve_site, site_activation

    captured: dict[int, Tensor] = {}
    hooks = [resolve_site(model, f"blocks.{layer}.hook_resid_post")[0].register_forward_hook(
        lambda _m, _i, out, layer=layer: captured.__setitem__(layer, site_activation(out)))
        for layer in layers]
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([captured[layer][0].float() for layer in layers])


def prompt_latents(sae: LoadedMLSAE, resid: Tensor) -> Tensor:
    """Dense latents (L, T, m) of residuals (L, T, d)."""
    with torch.inference_mode():
        codes = reconstruct(sae.params, resid, sae.k)[1]
    return dense_codes(codes, sae.params.W_dec.shape[0])


def prompt_table(latents: Tensor, tokens: list[str], layers: list[int], sae_id: str,
                 threshold: float = 1e-3) -> pd.DataFrame:
    """Long table of the heatmap: one row per (column, layer) (module docstring)."""
    lat = latents.double()  # (L, T, m)
    n_layers = lat.shape[0]
    pos, latent = (lat.amax(dim=0) > threshold).nonzero(as_tuple=True)
    cols = lat[:, pos, latent]  # (L, n_pairs)
    index = torch.arange(n_layers, dtype=torch.float64).unsqueeze(1)
    mean = (cols / cols.sum(0) * index).sum(0)
    order = torch.sort(mean, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    n = len(pos)
    return pd.DataFrame({
        "sae_id": sae_id, "rank": np.repeat(rank.numpy(), n_layers),
        "position": np.repeat(pos.numpy(), n_layers),
        "token": np.repeat(np.array(tokens, dtype=object)[pos.numpy()], n_layers),
        "latent": np.repeat(latent.numpy(), n_layers),
        "layer": np.tile(np.array(layers), n),
        "act": cols.T.reshape(-1).numpy(),
        "layer_mean": np.repeat(mean.numpy(), n_layers)})
