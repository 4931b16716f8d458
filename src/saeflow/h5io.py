"""HDF5 and file conventions shared by every stage.

Files written by saeflow
------------------------
``data/tokens/{corpus}.h5``
    ``tokens``  int32 [n_seq, ctx_len]; attrs ``corpus``, ``tokenizer``, ``ctx_len``, ``n_seq``,
    ``prepend_bos``, ``seed``.
``acts/{model}/{corpus}/{site}.h5``
    ``acts``    float32 [n_tokens, d_model], chunked along tokens
    ``tokens``  int32 [n_tokens] (the token id at each cached position)
    attrs ``model``, ``corpus``, ``site``, ``d_model``, ``n_seq``, ``ctx_len``, ``skip_positions``.
    Row ``t`` is sequence ``t // (ctx_len - skip_positions)`` at position
    ``skip_positions + t % (ctx_len - skip_positions)``.

Every file also carries ``saeflow_version`` and ``complete = 1``; the attribute is written last and
the file is renamed into place only afterwards (see :func:`atomic_path`), so an interrupted job
never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py

from saeflow import __version__


class InputFileError(ValueError):
    """An input file is missing, incomplete, or does not have the expected shape or attributes."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to ``path`` only if the block succeeds.

    Works for files and directories. On failure the temporary is removed and ``path`` is untouched.
    Temporaries of ``path`` left by a killed process (``kill -9``, a node lost) are removed first:
    Snakemake's lock lets only one job write an output at a time, so any other temporary of the
    same output belongs to a job that is gone.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    for stale in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        _remove(stale)
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()


class H5File(h5py.File):
    """An HDF5 file whose members are datasets, as in every file saeflow writes (it writes no
    groups). ``h5[name]`` is typed, and checked, as an :class:`h5py.Dataset`: h5py's own
    ``File.__getitem__`` may also return a group or a named datatype."""

    def __getitem__(self, name: str) -> h5py.Dataset:
        member = super().__getitem__(name)
        if isinstance(member, h5py.Dataset):
            return member
        if name == "/":  # h5py's own File.attrs reads the root group through this method
            return member  # pyright: ignore[reportReturnType]
        raise InputFileError(
            f"{self.filename}: '{name}' is a {type(member).__name__}, expected a dataset"
        )


def write_attrs(h5: h5py.File, attrs: Mapping[str, Any]) -> None:
    """Write provenance attributes; nested values are stored as JSON strings."""
    for key, value in attrs.items():
        h5.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
    h5.attrs["saeflow_version"] = __version__


def mark_complete(h5: h5py.File) -> None:
    """Mark a file finished. Call last, just before closing."""
    h5.attrs["complete"] = 1


def open_checked(
    path: str | os.PathLike[str],
    datasets: Mapping[str, tuple[int | None, ...]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> H5File:
    """Open a saeflow HDF5 file read-only and check it before any work is done on it.

    ``datasets`` maps a dataset name to its expected shape (``None`` for a free dimension);
    ``attrs`` maps attribute names to expected values. Any mismatch raises
    :class:`InputFileError` naming the file, the dataset or attribute, and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    try:
        h5 = H5File(path, "r")
    except OSError as err:
        raise InputFileError(f"{path}: not a readable HDF5 file ({err})") from err
    try:
        if h5.attrs.get("complete") != 1:
            raise InputFileError(f"{path}: incomplete file (no 'complete' attribute); rerun its rule")
        for name, shape in (datasets or {}).items():
            if name not in h5:
                raise InputFileError(f"{path}: dataset '{name}' missing; found {sorted(h5)}")
            actual = h5[name].shape
            if len(actual) != len(shape) or any(
                want is not None and want != got for want, got in zip(shape, actual)
            ):
                want_text = ", ".join("*" if s is None else str(s) for s in shape)
                raise InputFileError(
                    f"{path}: dataset '{name}' has shape {actual}, expected ({want_text})"
                )
        for key, want in (attrs or {}).items():
            got = h5.attrs.get(key)
            if got is None:
                raise InputFileError(f"{path}: attribute '{key}' missing, expected {want!r}")
            if plain(got) != plain(want):
                raise InputFileError(f"{path}: attribute '{key}' is {plain(got)!r}, expected {want!r}")
    except Exception:
        h5.close()
        raise
    return h5


def plain(value: Any) -> Any:
    """h5py returns numpy scalars and bytes; compare as plain Python values."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode()
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically, pretty-printed with sorted keys (stable diffs)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
