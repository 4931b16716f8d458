"""The ``mlsae`` config section: checks and the expansion of its sweep into one entry per MLSAE.

``mlsae.expansion_factors`` x ``mlsae.k`` expands to ids ``mlsae-x{R}-k{k}``; every MLSAE reads
``hook_resid_post`` of layers ``first_layer..last_layer`` of ``mlsae.model`` (all layers when
``last_layer`` is null). ``mlsae.baseline_layers`` adds single-layer baselines ``sae-x{R}-k{k}-layer{l}``:
the same trainer on layer ``l`` alone, at the width and k of each MLSAE named in
``mlsae.baseline_mlsaes`` (null: every trained one), on the same tokens.
"""

from __future__ import annotations

from typing import Any

from saeflow.models import describe


class MLSAEConfigError(ValueError):
    """The mlsae section is inconsistent; the message names the key."""


def enabled(config: dict) -> bool:
    section = config.get("mlsae", {})
    return bool(section.get("expansion_factors") or section.get("pretrained"))


def layers(config: dict) -> list[int]:
    """The layers every MLSAE reads, checked against the model's depth."""
    section = config["mlsae"]
    model = section["model"]
    if model not in config["models"]:
        raise MLSAEConfigError(f"mlsae.model: '{model}' is not declared under 'models'")
    dims = describe(config["models"][model]["path"])
    first, last = section["first_layer"], section["last_layer"]
    if last is None:
        if dims is None:
            raise MLSAEConfigError("mlsae.last_layer: give it when the model's depth is not "
                                   "known offline")
        last = dims[0] - 1
    if dims is not None and not 0 <= first <= last < dims[0]:
        raise MLSAEConfigError(f"mlsae.first_layer/last_layer: {first}..{last} is not a range "
                               f"of model '{model}' layers 0..{dims[0] - 1}")
    if first > last:
        raise MLSAEConfigError(f"mlsae.first_layer ({first}) is after last_layer ({last})")
    return list(range(first, last + 1))


def sites(config: dict) -> list[str]:
    return [f"blocks.{layer}.hook_resid_post" for layer in layers(config)]


def d_model(config: dict) -> int:
    dims = describe(config["models"][config["mlsae"]["model"]]["path"])
    if dims is None:
        raise MLSAEConfigError("mlsae.model: its d_model is not known offline")
    return dims[1]


def mlsae_table(config: dict) -> dict[str, dict[str, Any]]:
    """Every trained MLSAE by id: expansion factor, k and the training knobs."""
    if not enabled(config):
        return {}
    section = config["mlsae"]
    for key in ("corpus", "eval_corpus"):
        if section[key] not in config["corpora"]:
            raise MLSAEConfigError(f"mlsae.{key}: '{section[key]}' is not declared under "
                                   "'corpora'")
    table: dict[str, dict[str, Any]] = {}
    for factor in section["expansion_factors"]:
        for k in section["k"]:
            table[f"mlsae-x{factor}-k{k}"] = {"kind": "trained", "expansion_factor": factor,
                                              "k": k}
    for sae_id, entry in section.get("pretrained", {}).items():
        if sae_id in table:
            raise MLSAEConfigError(f"mlsae.pretrained.{sae_id}: id also produced by the sweep")
        if ("repo" in entry) == ("path" in entry):
            raise MLSAEConfigError(f"mlsae.pretrained.{sae_id}: give exactly one of 'repo' "
                                   "and 'path'")
        table[sae_id] = {"kind": "pretrained", **entry}
    return table



def example_mlsaes(config: dict) -> list[str]:
    """The MLSAE ids whose examples per (latent, layer) go into the feature database."""
    if not enabled(config):
        return []
    table = mlsae_table(config)
    chosen = config["mlsae"].get("example_mlsaes") or []
    for sae_id in chosen:
        if sae_id not in table:
            raise MLSAEConfigError(f"mlsae.example_mlsaes: '{sae_id}' is not an MLSAE of the "
                                   f"section (expected one of {sorted(table)})")
    return sorted(set(chosen))


def baselines(config: dict) -> dict[str, dict[str, Any]]:
    """Every single-layer baseline by id: the MLSAE it is compared with, its layer, R and k."""
    if not enabled(config):
        return {}
    section = config["mlsae"]
    layer_list = section.get("baseline_layers") or []
    if not layer_list:
        return {}
    table = mlsae_table(config)
    trained = sorted(i for i, s in table.items() if s["kind"] == "trained")
    chosen = section.get("baseline_mlsaes")
    chosen = trained if chosen is None else chosen
    for sae_id in chosen:
        if sae_id not in trained:
            raise MLSAEConfigError(f"mlsae.baseline_mlsaes: '{sae_id}' is not a trained MLSAE "
                                   f"of the sweep (expected one of {trained})")
    read = layers(config)
    for layer in layer_list:
        if layer not in read:
            raise MLSAEConfigError(f"mlsae.baseline_layers: layer {layer} is not read by the "
                                   f"MLSAEs (layers {read[0]}..{read[-1]})")
    out: dict[str, dict[str, Any]] = {}
    for sae_id in chosen:
        sae = table[sae_id]
        for layer in sorted(set(layer_list)):
            out[f"sae-x{sae['expansion_factor']}-k{sae['k']}-layer{layer}"] = {
                "mlsae_id": sae_id, "layer": layer,
                "expansion_factor": sae["expansion_factor"], "k": sae["k"]}
    return out
