"""Configuration checks and expansion that JSON Schema cannot express.

The Snakefile first validates the config against ``workflow/schemas/config.schema.yaml`` (types,
ranges, unknown keys), then calls :func:`check` for cross-references (a family naming a model that
is not declared, a layer past the model's last one, ...) and :func:`sae_table` to expand SAE
families into one entry per SAE. Every error names the config key and what was expected.
"""

from __future__ import annotations

import math
from typing import Any

from saeflow.models import describe, parse_site
from saeflow.saes import expand_family


class ConfigError(ValueError):
    """A config value is inconsistent; the message names the key."""


def _need(config: dict, section: str, name: str, key: str) -> None:
    if name not in config.get(section, {}):
        known = ", ".join(sorted(config.get(section, {}))) or "none"
        raise ConfigError(f"{key}: '{name}' is not declared under '{section}' (declared: {known})")


def _check_site(config: dict, model: str, site: str, key: str) -> None:
    try:
        layer = parse_site(site).layer
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from err
    dims = describe(config["models"][model]["path"])
    if dims is not None and not 0 <= layer < dims[0]:
        raise ConfigError(
            f"{key}: layer {layer} of site '{site}' is out of range; model '{model}' has "
            f"{dims[0]} layers (0..{dims[0] - 1})"
        )


def check(config: dict) -> None:
    """Raise :class:`ConfigError` on the first inconsistency, naming its key."""
    for name, corpus in config["corpora"].items():
        _need(config, "models", corpus["tokenizer"], f"corpora.{name}.tokenizer")
        if corpus["source"] == "hf" and "hf" not in corpus:
            raise ConfigError(f"corpora.{name}: source 'hf' needs an 'hf' block with a 'path'")
    for name, model in config["models"].items():
        for i, site in enumerate(model.get("sites", [])):
            _check_site(config, name, site, f"models.{name}.sites[{i}]")
    for name, family in config["sae_families"].items():
        key = f"sae_families.{name}"
        _need(config, "models", family["model"], f"{key}.model")
        _need(config, "corpora", family["corpus"], f"{key}.corpus")
        _check_site(config, family["model"], family["site"], f"{key}.site")
    for name, sae in config.get("pretrained_saes", {}).items():
        key = f"pretrained_saes.{name}"
        _need(config, "models", sae["model"], f"{key}.model")
        _check_site(config, sae["model"], sae["site"], f"{key}.site")
        if ("path" in sae) == ("release" in sae or "sae_id" in sae):
            raise ConfigError(f"{key}: give either 'path' or both 'release' and 'sae_id'")
        if "path" not in sae and not ("release" in sae and "sae_id" in sae):
            raise ConfigError(f"{key}: 'release' and 'sae_id' go together")
    for name, family in config.get("pretrained_families", {}).items():
        key = f"pretrained_families.{name}"
        _need(config, "models", family["model"], f"{key}.model")
        _check_site(config, family["model"], family["site"], f"{key}.site")
        expand_pretrained_family(name, family)  # raises on a bad template or width label
    _need(config, "corpora", config["evaluation"]["corpus"], "evaluation.corpus")
    _check_dark_matter(config)


def _check_dark_matter(config: dict) -> None:
    """The Dark Matter family must sweep k (topk, batchtopk) over at least 3 widths."""
    name = config.get("dark_matter", {}).get("family")
    if name is None:
        return
    pretrained = config.get("pretrained_families", {})
    if name in pretrained:
        widths = pretrained[name]["grid"]
        if len(widths) < 3:
            raise ConfigError(
                f"dark_matter.family: pretrained family '{name}' has {len(widths)} width(s); "
                "the power law FVU = c + a·W^(-m) needs at least 3"
            )
        return
    if name not in config.get("sae_families", {}):
        known = ", ".join(sorted([*config.get("sae_families", {}), *pretrained])) or "none"
        raise ConfigError(f"dark_matter.family: '{name}' is not declared under 'sae_families' "
                          f"or 'pretrained_families' (declared: {known})")
    family = config["sae_families"][name]
    if family["architecture"] not in ("topk", "batchtopk"):
        raise ConfigError(
            f"dark_matter.family: family '{name}' is {family['architecture']}; the scaling "
            "figures sweep k, so it must be topk or batchtopk"
        )
    widths = family.get("widths", family.get("expansion_factors", []))
    widths = widths if isinstance(widths, list) else [widths]
    if len(set(widths)) < 3:
        raise ConfigError(
            f"dark_matter.family: family '{name}' has {len(set(widths))} width(s); the power "
            "law FVU = c + a·W^(-m) needs at least 3"
        )


def sae_table(config: dict) -> dict[str, dict[str, Any]]:
    """Every SAE of the run by id: trained ones expanded from families, then pretrained ones.

    Each entry has ``model``, ``site``, ``kind`` ("trained" or "pretrained") and the parameters
    that produce it; a trained entry also has ``corpus`` and ``family``.
    """
    table: dict[str, dict[str, Any]] = {}
    for name, family in config["sae_families"].items():
        for sae_id, params in expand_family(name, family).items():
            table[sae_id] = {**params, "kind": "trained", "family": name}
    for name, family in config.get("pretrained_families", {}).items():
        for sae_id, entry in expand_pretrained_family(name, family).items():
            if sae_id in table:
                raise ConfigError(f"pretrained_families.{name}: id '{sae_id}' also produced by "
                                  "another family")
            table[sae_id] = entry
    for sae_id, sae in config.get("pretrained_saes", {}).items():
        if sae_id in table:
            raise ConfigError(f"pretrained_saes.{sae_id}: id also produced by an SAE family")
        table[sae_id] = {**sae, "kind": "pretrained"}
    return table


def width_from_label(label: str | int, key: str) -> int:
    """A release's width label as a number of latents: "16k" -> 16384, "65k" -> 65536.

    Gemma Scope widths are powers of two named by their rounded thousands or millions ("131k"
    is 2^17, "1m" is 2^20), so a k / m label is the power of two closest to it; a plain
    number is taken as it is.
    """
    text = str(label)
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise ConfigError(f"{key}: width label {label!r} is not a number optionally followed "
                          "by k or m")
    if scale == 1:
        return int(digits)
    return 1 << round(math.log2(int(digits) * scale))


def expand_pretrained_family(name: str, family: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A release's (width, L0) grid as pretrained SAE entries, ``{name}-w{label}-l0-{l0}``.

    Entries carry ``d_sae`` (as trained ones do) and the release's nominal ``l0``, but no ``k``:
    Gemma Scope SAEs are JumpReLU, so their L0 varies per token.

    Gemma Scope names its SAEs ``layer_20/width_16k/average_l0_58``: the widths and L0s differ
    from release to release, so the grid is listed per width label rather than as a product.
    """
    key = f"pretrained_families.{name}"
    template = family["sae_id"]
    if "{width}" not in template or "{l0}" not in template:
        raise ConfigError(f"{key}.sae_id: {template!r} must contain {{width}} and {{l0}}")
    entries = {}
    for label, l0s in family["grid"].items():
        width = width_from_label(label, f"{key}.grid")
        for l0 in l0s:
            entries[f"{name}-w{label}-l0-{l0}"] = {
                "model": family["model"], "site": family["site"], "kind": "pretrained",
                "family": name, "release": family["release"],
                "sae_id": template.format(width=label, l0=l0), "d_sae": width, "l0": l0,
            }
    return entries


def sites_to_cache(config: dict, model: str) -> list[str]:
    """Sites of ``model`` to cache: those its SAEs read plus the extra ones declared."""
    sites = set(config["models"][model].get("sites", []))
    sites |= {sae["site"] for sae in sae_table(config).values() if sae["model"] == model}
    return sorted(sites)
