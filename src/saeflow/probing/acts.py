"""Stage: last-token model activations of the probing prompts, one HDF5 file per dataset.

``python -m saeflow.probing.acts --model DIR --site S [--site S2] --dataset D --out D.h5 [...]``

As the original's ``generate_model_activations.py`` (reference B2): the tokenizer truncates on
the left to ``max_length`` tokens (so the end of a long prompt, where the label usually shows, is
kept) and the activation kept is the last real token's. Prompts are batched by length and padded
on the right; with causal attention a right pad never changes an earlier position, so the last
real token's activation equals the unpadded one (tested). The forward pass stops after the last
needed layer (:func:`saeflow.activations.capture_batch`). A dataset name ending in ``_OOD`` is the
OOD set of the named dataset.

File layout: ``acts/{site}`` float32 [n, d_model], ``y`` int64 [n], ``n_tokens`` int32 [n] (after
truncation); attrs ``model``, ``dataset``, ``sites``, ``max_length``, ``max_rows``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import h5py
import numpy as np
import torch
from nnsight import NNsight
from tqdm import tqdm

from saeflow import h5io
from saeflow.activations import capture_batch, execution_order
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.models import load_model, resolve_site
from saeflow.probing.datasets import load, parse_custom


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt, truncated on the left to ``max_length``."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return [list(seq[-max_length:]) if len(seq) else [tokenizer.eos_token_id] for seq in ids]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, t] padded on the right, last real position [b])."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


def last_token_acts(traced, model, seqs: Sequence[Sequence[int]], sites: Sequence[str],
                    batch_tokens: int, pad_id: int) -> dict[str, np.ndarray]:
    """{site: float32 [n, d]} at each sequence's last token, batched by length."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    d = model.config.hidden_size
    out = {site: np.zeros((len(seqs), d), dtype=np.float32) for site in sites}
    start = 0
    progress = tqdm(total=len(seqs), unit="prompt", desc="probing acts", leave=False)
    while start < len(order):
        # Sorted by length: a batch holds about batch_tokens tokens of its longest prompt.
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * len(seqs[order[stop]]) <= batch_tokens:
            stop += 1
        rows = order[start:stop]
        ids, last = pad_right([seqs[i] for i in rows], pad_id)
        acts = capture_batch(traced, model, ids.to(model.device), sites)
        for site in sites:
            out[site][rows] = acts[site][torch.arange(len(rows)), last.to(model.device)].float().cpu().numpy()
        progress.update(len(rows))
        start = stop
    progress.close()
    return out


def write(path: str, acts: dict[str, np.ndarray], y: np.ndarray, n_tokens: np.ndarray,
          attrs: dict) -> None:
    with h5io.atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for site, array in acts.items():
            h5.create_dataset(f"acts/{site}", data=array)
        h5.create_dataset("y", data=y.astype(np.int64))
        h5.create_dataset("n_tokens", data=n_tokens.astype(np.int32))
        h5io.write_attrs(h5, {**attrs, "sites": list(acts)})
        h5io.mark_complete(h5)


def read(path: str, site: str) -> tuple[np.ndarray, np.ndarray]:
    """(acts float32 [n, d], y int64 [n]) of one site from a file written by :func:`write`."""
    with h5io.open_checked(path, datasets={"y": (None,)}) as h5:
        group = h5.get("acts")
        if not isinstance(group, h5py.Group) or not isinstance(group.get(site), h5py.Dataset):
            have = sorted(group) if isinstance(group, h5py.Group) else []
            raise h5io.InputFileError(f"{path}: no activations for site '{site}'; has {have}")
        return np.asarray(group[site]), np.asarray(h5["y"])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saeflow.probing.acts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF folder or model id")
    p.add_argument("--model-name", default="", help="recorded in the attributes")
    p.add_argument("--site", action="append", required=True)
    p.add_argument("--dataset", action="append", required=True, help="name; NAME_OOD for its OOD set")
    p.add_argument("--out", action="append", required=True, help="one per --dataset")
    p.add_argument("--custom", action="append", default=[], help="NAME=PATH of a prompt,target CSV")
    p.add_argument("--max-rows", type=int, default=None, help="first rows kept per dataset")
    p.add_argument("--max-length", type=int, default=1024, help="tokens kept (left truncation)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    args = p.parse_args(argv)
    if len(args.dataset) != len(args.out):
        p.error(f"got {len(args.dataset)} --dataset but {len(args.out)} --out")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    custom = parse_custom(args.custom)
    # Read every dataset first, so a bad name or file fails before the model loads.
    data = {}
    for name in args.dataset:
        ood = name.endswith("_OOD")
        data[name] = load(name.removesuffix("_OOD") if ood else name, custom, ood=ood,
                          max_rows=None if ood else args.max_rows)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    sites = execution_order(args.site)
    for site in sites:
        resolve_site(model, site)
    traced = NNsight(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad) if isinstance(pad, int) else 0  # any id: padded positions are never read
    with torch.inference_mode():
        for name, out in tqdm(list(zip(args.dataset, args.out)), desc="datasets", unit="ds"):
            seqs = tokenize(tokenizer, data[name].prompts, args.max_length)
            acts = last_token_acts(traced, model, seqs, sites, args.batch_tokens, pad_id)
            write(out, acts, data[name].y, np.array([len(s) for s in seqs]),
                  {"model": args.model_name or args.model, "dataset": name,
                   "max_length": args.max_length, "max_rows": args.max_rows or -1})


if __name__ == "__main__":
    main()
