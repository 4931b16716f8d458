"""SAEs on disk: load any SAELens-layout folder, import pretrained SAEs, expand SAE families.

Every SAE in the DAG, trained or imported, is a folder ``saes/{sae_id}/`` with SAELens's
``cfg.json`` + ``sae_weights.safetensors``, so ``sae_lens.SAE.load_from_disk`` loads it.

Import a pretrained SAE::

    python -m saeflow.saes import --out results/saes/gemmascope-l12 \\
        --release gemma-scope-2b-pt-res-canonical --sae-id layer_12/width_16k/canonical
    python -m saeflow.saes import --out results/saes/mine --path /data/my_sae_folder
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saeflow.h5io import InputFileError, atomic_path

if TYPE_CHECKING:
    from sae_lens import SAE

# The file names of SAELens's layout (sae_lens.constants; tests/unit/test_saes.py checks they
# match). Spelled out here because importing sae_lens takes seconds, and the Snakefile imports
# this module (for expand_family) on every snakemake start.
SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"

# The key a family sweeps besides the width, per architecture, and how it appears in SAE ids.
SWEEP_KEY = {
    "topk": "k",
    "batchtopk": "k",
    "standard": "l1_coefficient",
    "gated": "l1_coefficient",
    "jumprelu": "l0_coefficient",
    "saex": "sparsity_coefficient",
}
_ID_TAG = {"k": "k", "l1_coefficient": "l1_", "l0_coefficient": "l0_", "sparsity_coefficient": "s"}
# Scalar keys a family may carry, passed through to every member. Apart from model, corpus and
# site, each is a flag of python -m saeflow.train with '-' for '_' (lr_warmup_steps ->
# --lr-warmup-steps); the config schema's checkpoint_every is --checkpoint-every.
_COMMON_KEYS = {
    "model", "corpus", "site", "lr", "tokens", "batch_size", "seed", "checkpoint_every",
    "lr_warmup_steps",
}  # fmt: skip
_SAE_LENS_KEYS = {"lr_decay_steps", "normalize_activations", "dead_feature_window"}
# saeflow.train's saex flags (saeflow.saex_train.SaexTrainConfig)
_SAEX_KEYS = {
    "sparsity_loss", "recip_eps", "recip_anneal_steps", "tanh_stretch", "decoder_norm_weighted",
    "per_latent_scale", "restrict_dec_norm", "project_decoder", "ghost_grads",
    "dead_after_steps", "input_norm", "encoder_init", "decoder_init", "b_dec_init",
    "adam_beta1", "adam_beta2", "clip_grad_norm", "gated",
}  # fmt: skip
# saeflow.train's topk flags of Llama Scope's recipe (saeflow.topk.TopKTrainConfig)
_LLAMASCOPE_KEYS = {
    "decoder_norm_topk", "decoder_init_norm", "activation_norm", "initial_k", "k_warmup_steps",
    "k_schedule", "k_exponential_factor", "lr_cooldown_steps", "lr_end_ratio", "save_as",
    "adam_beta1", "adam_beta2", "clip_grad_norm",
}  # fmt: skip
_ARCH_KEYS: dict[str, set[str]] = {
    "saex": _SAEX_KEYS,
    "topk": {"auxk_coef", "k_aux", "dead_tokens_threshold", "selection_dtype"} | _LLAMASCOPE_KEYS,
    "batchtopk": _SAE_LENS_KEYS | {"aux_loss_coefficient", "topk_threshold_lr"},
    "standard": _SAE_LENS_KEYS | {"l1_warm_up_steps"},
    "gated": _SAE_LENS_KEYS | {"l1_warm_up_steps"},
    "jumprelu": _SAE_LENS_KEYS | {
        "l0_warm_up_steps", "jumprelu_init_threshold", "jumprelu_bandwidth",
        "jumprelu_sparsity_loss_mode", "pre_act_loss_coefficient",
    },
}  # fmt: skip
_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$")


class FamilyError(ValueError):
    """An SAE family declaration is malformed."""


class ImportSAEError(RuntimeError):
    """A pretrained SAE could not be imported."""


def load_sae(path: str | os.PathLike[str]) -> SAE[Any]:
    """Load an SAE folder in the SAELens layout (any architecture) as float32 on the CPU."""
    from sae_lens import SAE
    folder = Path(path)
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (folder / name).is_file():
            raise InputFileError(
                f"{folder}: not an SAE folder in the SAELens layout ({name} missing; "
                f"expected {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME})"
            )
    try:
        return SAE.load_from_disk(folder, device="cpu", dtype="float32")
    except Exception as err:  # SAELens raises many kinds; name the folder
        raise InputFileError(f"{folder}: SAELens cannot load this SAE ({err})") from err


def hub_offline() -> bool:
    """True when the Hugging Face hub may not be contacted (HF_HUB_OFFLINE)."""
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return flag or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def import_pretrained(out: str | os.PathLike[str], release: str, sae_id: str) -> Path:
    """Download ``release``/``sae_id`` with ``SAE.from_pretrained`` and save it into ``out``."""
    if hub_offline():
        raise ImportSAEError(
            f"release {release!r} (sae_id {sae_id!r}) needs the Hugging Face hub, but "
            "HF_HUB_OFFLINE is set; run with network access, or download the folder and "
            "import it with --path"
        )
    from sae_lens import SAE

    sae = SAE.from_pretrained(release, sae_id, device="cpu", dtype="float32")
    sae.cfg.metadata.saeflow_source = {"release": release, "sae_id": sae_id}
    with atomic_path(out) as tmp:
        sae.save_model(tmp)
    return Path(out)


def import_local(out: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` loads as an SAE, then copy the folder into ``out``."""
    src, dst = Path(path), Path(out)
    if src.resolve() == dst.resolve():
        raise ImportSAEError(f"--path and --out are the same folder: {src}")
    load_sae(src)
    with atomic_path(dst) as tmp:
        shutil.copytree(src, tmp)
    return dst


def expand_family(
    name: str, family: Mapping[str, Any], d_in: int | None = None
) -> dict[str, dict[str, Any]]:
    """Expand the SAE family ``name`` into ``{sae_id: params}``, one entry per grid point.

    ``family`` (a ``sae_families`` entry of the config) has ``architecture`` (topk, batchtopk,
    standard, jumprelu, gated); the widths as ``widths`` or as ``expansion_factors`` (multiples
    of the input width); the sweep values under the architecture's SAELens name (``k`` for
    topk/batchtopk, ``l1_coefficient`` for standard/gated, ``l0_coefficient`` for jumprelu; a
    scalar or a list); and scalar settings passed through to every member (``model``,
    ``corpus``, ``site``, ``lr``, ``tokens``, ``batch_size``, ``seed``, ...).

    Ids are ``{name}-w{width}-k{k}``, ``{name}-w{width}-l1_{coef}`` or ``{name}-w{width}-l0_{coef}``,
    in declaration order (widths outer). Params carry ``family``, ``architecture``, ``d_sae``,
    the sweep key and the pass-through settings. Expansion factors become widths when ``d_in``
    is given; otherwise ids read ``{name}-x{factor}-...`` and params carry ``expansion_factor``
    instead of ``d_sae`` (the train stage reads d_in from the activations file).
    """
    _check_name(name)
    arch = family.get("architecture")
    if arch not in SWEEP_KEY:
        raise FamilyError(
            f"family {name!r}: architecture {arch!r} is not one of {sorted(SWEEP_KEY)}"
        )
    sweep = SWEEP_KEY[arch]
    passthrough = _passthrough(family, name, arch, sweep)
    sizes = _sizes(family, name, d_in)
    values = _as_list(family, sweep, name, f"architecture {arch!r} needs {sweep!r}")
    for value in values:
        _check_number(name, sweep, value, integer=sweep == "k", zero_ok=sweep != "k")
    members: dict[str, dict[str, Any]] = {}
    for (size_tag, size), value in itertools.product(sizes, values):
        sae_id = f"{name}-{size_tag}-{_ID_TAG[sweep]}{format_number(value)}"
        if sae_id in members:
            raise FamilyError(f"family {name!r}: grid point {sae_id!r} is declared twice")
        members[sae_id] = {"family": name, "architecture": arch, **size, sweep: value}
        members[sae_id].update(passthrough)
    return members


def format_number(value: float) -> str:
    """Readable, exact, filename-safe: 32 -> '32', 0.0001 -> '0.0001', 2.5 -> '2.5'."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return np.format_float_positional(float(value), trim="-")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FamilyError(
            f"family name {name!r} must be letters, digits, '_', '.' and single '-' between them"
        )


def _passthrough(family: Mapping[str, Any], name: str, arch: str, sweep: str) -> dict[str, Any]:
    structural = {"architecture", "widths", "expansion_factors", sweep}
    allowed = _COMMON_KEYS | _ARCH_KEYS[arch]
    out = {}
    for key, value in family.items():
        if key in structural:
            continue
        if key not in allowed:
            raise FamilyError(
                f"family {name!r}: key {key!r} is not valid for architecture {arch!r}; "
                f"valid keys: {sorted(allowed | structural)}"
            )
        if isinstance(value, list | tuple | dict):
            raise FamilyError(
                f"family {name!r}: {key!r} must be a single value (only the widths and "
                f"{sweep!r} are swept), got {value!r}"
            )
        out[key] = value
    return out


def _sizes(
    family: Mapping[str, Any], name: str, d_in: int | None
) -> list[tuple[str, dict[str, Any]]]:
    """(id tag, params) per width: ('w2304', {'d_sae': 2304}) or ('x4', {'expansion_factor': 4})."""
    if ("widths" in family) == ("expansion_factors" in family):
        raise FamilyError(f"family {name!r}: give exactly one of 'widths' and 'expansion_factors'")
    if "widths" in family:
        widths = _as_list(family, "widths", name, "")
        for width in widths:
            _check_number(name, "widths", width, integer=True, zero_ok=False)
        return [(f"w{w}", {"d_sae": int(w)}) for w in widths]
    sizes = []
    for factor in _as_list(family, "expansion_factors", name, ""):
        _check_number(name, "expansion_factors", factor, integer=False, zero_ok=False)
        if d_in is None:
            sizes.append((f"x{format_number(factor)}", {"expansion_factor": factor}))
            continue
        width = d_in * factor
        if not float(width).is_integer():
            raise FamilyError(
                f"family {name!r}: expansion factor {factor} times d_in {d_in} is not a whole width"
            )
        sizes.append((f"w{int(width)}", {"d_sae": int(width)}))
    return sizes


def _as_list(family: Mapping[str, Any], key: str, name: str, missing: str) -> list[Any]:
    if key not in family:
        raise FamilyError(f"family {name!r}: {missing or repr(key) + ' missing'}")
    value = family[key]
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise FamilyError(f"family {name!r}: {key!r} is empty")
    return values


def _check_number(name: str, key: str, value: Any, integer: bool, zero_ok: bool) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or value < 0 or (value == 0 and not zero_ok):
        kind = ("non-negative " if zero_ok else "positive ") + (
            "integers" if integer else "numbers"
        )
        raise FamilyError(f"family {name!r}: {key!r} values must be {kind}, got {value!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saeflow.saes", description=(__doc__ or "").split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a pretrained SAE into the SAELens layout")
    imp.add_argument("--out", required=True, help="destination SAE folder")
    imp.add_argument("--release", help="SAELens release name or Hugging Face repo id")
    imp.add_argument("--sae-id", help="SAE id within the release")
    imp.add_argument("--path", help="a local SAE folder in the SAELens layout")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.path is not None and (args.release or args.sae_id):
        parser.error("give either --path or --release with --sae-id, not both")
    if args.path is None and not (args.release and args.sae_id):
        parser.error("give --release and --sae-id together, or --path")
    try:
        if args.path is not None:
            import_local(args.out, args.path)
        else:
            import_pretrained(args.out, args.release, args.sae_id)
    except (InputFileError, ImportSAEError) as err:
        sys.exit(f"saeflow.saes import: error: {err}")


if __name__ == "__main__":
    main()
