"""Stage: SAE latents of the probing prompts' last-token activations, stored sparse (CSR).

``python -m saeflow.probing.sae_acts --sae saes/ID --site S --acts D.h5 --out O.h5 [...]``

One job per SAE encodes every dataset (the original ran one SAE per process because of a CUDA
memory leak, reference B9.10; here the SAE is loaded once and the inputs stream through it).
Layout: ``data`` float32 [nnz], ``indices`` int32 [nnz], ``indptr`` int64 [n + 1], ``y`` int64 [n];
attrs ``d_sae``, ``sae_id``, ``site``, ``dataset``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import h5py
import numpy as np
import torch
from scipy import sparse

from saeflow import h5io
from saeflow.probing.acts import read
from saeflow.saes import load_sae


def encode_sparse(sae, x: np.ndarray, batch_size: int = 256) -> sparse.csr_matrix:
    """CSR [n, d_sae] of ``sae.encode`` over ``x`` [n, d_in], batch by batch (bounded memory)."""
    blocks = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            z = sae.encode(torch.from_numpy(x[start : start + batch_size]).float())
            blocks.append(sparse.csr_matrix(z.cpu().numpy()))
    if not blocks:
        return sparse.csr_matrix((0, int(sae.cfg.d_sae)), dtype=np.float32)
    stacked: sparse.csr_matrix = sparse.csr_matrix(sparse.vstack(blocks), dtype=np.float32)
    return stacked


def write(path: str, z: sparse.csr_matrix, y: np.ndarray, attrs: dict) -> None:
    z = sparse.csr_matrix(z)
    assert z.data is not None and z.indices is not None
    with h5io.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("data", data=z.data.astype(np.float32))
        h5.create_dataset("indices", data=z.indices.astype(np.int32))
        h5.create_dataset("indptr", data=z.indptr.astype(np.int64))
        h5.create_dataset("y", data=y.astype(np.int64))
        n, d = z.get_shape()
        h5io.write_attrs(h5, {**attrs, "d_sae": int(d), "n": int(n)})
        h5io.mark_complete(h5)


def read_sparse(path: str) -> tuple[sparse.csr_matrix, np.ndarray]:
    """(CSR [n, d_sae], y [n]) from a file written by :func:`write`."""
    with h5io.open_checked(path, datasets={"data": (None,), "indices": (None,),
                                           "indptr": (None,), "y": (None,)}) as h5:
        n, d = int(h5io.plain(h5.attrs["n"])), int(h5io.plain(h5.attrs["d_sae"]))
        z = sparse.csr_matrix((np.asarray(h5["data"]), np.asarray(h5["indices"]),
                               np.asarray(h5["indptr"])), shape=(n, d))
        return z, np.asarray(h5["y"])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.probing.sae_acts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE folder (SAELens layout)")
    p.add_argument("--sae-id", default="")
    p.add_argument("--site", required=True, help="the site the SAE reads")
    p.add_argument("--acts", action="append", required=True, help="probing acts file (repeat)")
    p.add_argument("--out", action="append", required=True, help="one per --acts")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.acts) != len(args.out):
        p.error(f"got {len(args.acts)} --acts but {len(args.out)} --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    sae = load_sae(args.sae)
    for src, out in zip(args.acts, args.out):
        x, y = read(src, args.site)
        z = encode_sparse(sae, x)
        write(out, z, y, {"sae_id": args.sae_id, "site": args.site, "source": src})


if __name__ == "__main__":
    main()
