"""Typed access to HDF5 datasets (h5py types ``file[name]`` as Group | Dataset | Datatype)."""

from __future__ import annotations

import h5py

from saeflow import h5io


def dataset(h5: h5py.File | h5py.Group, name: str) -> h5py.Dataset:
    """``h5[name]``, which must be a dataset (a clear error naming the file otherwise)."""
    obj = h5[name]
    if not isinstance(obj, h5py.Dataset):
        raise h5io.InputFileError(f"{h5.file.filename}: '{name}' is a {type(obj).__name__}, "
                                  "expected a dataset")
    return obj
