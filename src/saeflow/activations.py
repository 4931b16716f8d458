"""Stage: cache model activations at hook sites, and per-token LM loss, into chunked HDF5.

``python -m saeflow.activations cache --model DIR --tokens T.h5 --site S --out O.h5 [--site S2 --out O2.h5]``
``python -m saeflow.activations loss  --model DIR --tokens T.h5 --out loss.h5``

Caching traces the model with nnsight and stops the forward pass right after the last module it
needs, so the cost is the forward up to that layer (no final norm, no unembedding). Batches stream
to disk through a writer thread that overlaps the next forward pass; memory holds one batch of one
site at a time, never all tokens. File layouts are documented in :mod:`saeflow.h5io`.
"""

from __future__ import annotations

import argparse
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch
from nnsight import NNsight
from tqdm import tqdm

from saeflow import h5io
from saeflow.device import DEVICE_HELP, resolve_device
from saeflow.metrics import next_token_ce
from saeflow.models import load_model, parse_site, resolve_site

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Order of sites inside one decoder layer: nnsight must be asked for outputs in execution order.
_KIND_ORDER = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}


def envoy_for(traced: NNsight, model: torch.nn.Module, module: torch.nn.Module):
    """The nnsight envoy that wraps ``module`` (found by its dotted name inside ``model``)."""
    name = next(n for n, m in model.named_modules() if m is module)
    envoy = traced
    for part in name.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def execution_order(sites: Sequence[str]) -> list[str]:
    """Sites sorted as the forward pass reaches them."""
    return sorted(sites, key=lambda s: (parse_site(s).layer, _KIND_ORDER[parse_site(s).kind]))


def capture_batch(
    traced: NNsight, model: PreTrainedModel, ids: torch.Tensor, sites: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run ``ids`` [b, t] through the model up to the last site; return {site: [b, t, d]}."""
    envoys = [envoy_for(traced, model, resolve_site(model, s)[0]) for s in sites]
    saved = {}
    with traced.trace(ids) as tracer:
        for site, envoy in zip(sites, envoys):
            out = envoy.output
            saved[site] = (out[0] if isinstance(out, tuple) else out).save()
        # nnsight's InterleavingTracer has stop() (it ends the forward pass after the last site);
        # its type stubs do not declare it.
        tracer.stop()  # pyright: ignore[reportAttributeAccessIssue]
    return {site: value.detach() for site, value in saved.items()}


def batches(tokens: h5py.Dataset, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first sequence index, token ids [b, t]) over a tokens dataset."""
    for start in range(0, tokens.shape[0], batch_size):
        yield start, torch.from_numpy(tokens[start : start + batch_size].astype(np.int64))


class BackgroundWriter:
    """Writes (dataset, offset, array) jobs on a thread so disk I/O overlaps the next forward."""

    def __init__(self, depth: int = 2) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                try:
                    dataset, offset, array = job
                    dataset[offset : offset + len(array)] = array
                except BaseException as err:  # noqa: BLE001 (surfaced by put()/close())
                    self._error = err

    def put(self, dataset: h5py.Dataset, offset: int, array: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put((dataset, offset, array))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def read_tokens(path: str) -> h5io.H5File:
    """Open a tokens file, checking its layout."""
    return h5io.open_checked(path, datasets={"tokens": (None, None)})


def cache_activations(
    model_path: str,
    tokens_path: str,
    outputs: dict[str, str],
    batch_size: int,
    skip_positions: int,
    chunk_tokens: int,
    attrs: dict,
    dtype: str = "float32",
    device: str = "cpu",
) -> None:
    """Cache every site in ``outputs`` ({site: path}) in one pass over the tokens file."""
    model, _ = load_model(model_path, dtype=dtype, device=device)
    sites = execution_order(list(outputs))
    for site in sites:
        resolve_site(model, site)  # fails on a bad site before any forward pass
    traced = NNsight(model)
    with read_tokens(tokens_path) as tok_file, ExitStack() as stack:
        tokens = tok_file["tokens"]
        n_seq, ctx = tokens.shape
        if not 0 <= skip_positions < ctx:
            raise ValueError(f"skip_positions={skip_positions} must be in [0, ctx_len={ctx})")
        kept = ctx - skip_positions
        d = model.config.hidden_size
        meta = {**attrs, "n_seq": n_seq, "ctx_len": ctx, "skip_positions": skip_positions,
                "d_model": d, "tokens_file": str(tokens_path)}
        files = {}
        for site in sites:
            tmp = stack.enter_context(h5io.atomic_path(outputs[site]))
            files[site] = stack.enter_context(h5py.File(tmp, "w"))
            _create_acts_datasets(files[site], n_seq * kept, d, chunk_tokens)
            h5io.write_attrs(files[site], {**meta, "site": site})
        writer = BackgroundWriter()
        try:
            _stream(traced, model, tokens, sites, files, writer, batch_size, skip_positions)
        finally:
            writer.close()
        for h5 in files.values():
            h5io.mark_complete(h5)
            h5.close()


def _create_acts_datasets(h5: h5py.File, n_tokens: int, d: int, chunk_tokens: int) -> None:
    chunk = max(1, min(chunk_tokens, n_tokens))
    h5.create_dataset("acts", shape=(n_tokens, d), dtype="float32", chunks=(chunk, d))
    h5.create_dataset("tokens", shape=(n_tokens,), dtype="int32", chunks=(chunk,))


def _stream(traced, model, tokens, sites, files, writer, batch_size, skip) -> None:
    kept = tokens.shape[1] - skip
    progress = tqdm(total=tokens.shape[0] * tokens.shape[1], unit="tok", desc="activations")
    with torch.inference_mode():
        for start, ids in batches(tokens, batch_size):
            acts = capture_batch(traced, model, ids.to(model.device), sites)
            offset = start * kept
            flat_ids = ids[:, skip:].reshape(-1).numpy().astype(np.int32)
            for site in sites:
                rows = acts[site][:, skip:].reshape(-1, acts[site].shape[-1])
                writer.put(files[site]["acts"], offset, rows.float().cpu().numpy())
                writer.put(files[site]["tokens"], offset, flat_ids)
            progress.update(ids.numel())
    progress.close()


def per_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the full model: ids [b, t] -> [b, t-1] (float32)."""
    with torch.inference_mode():
        logits = model(ids).logits
    return next_token_ce(logits, ids).float()


def cache_loss(model_path: str, tokens_path: str, out: str, batch_size: int,
               attrs: dict, dtype: str = "float32", device: str = "cpu") -> None:
    """Write ``loss`` [n_seq, ctx-1] (loss[s, p] predicts token p+1) and ``tokens`` [n_seq, ctx]."""
    model, _ = load_model(model_path, dtype=dtype, device=device)
    with read_tokens(tokens_path) as tok_file, h5io.atomic_path(out) as tmp:
        tokens = tok_file["tokens"]
        n_seq, ctx = tokens.shape
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("tokens", data=tokens[:])
            loss = h5.create_dataset("loss", shape=(n_seq, ctx - 1), dtype="float32")
            h5io.write_attrs(h5, {**attrs, "n_seq": n_seq, "ctx_len": ctx})
            for start, ids in tqdm(batches(tokens, batch_size), desc="lm loss",
                                   total=-(-n_seq // batch_size), unit="batch"):
                loss[start : start + len(ids)] = per_token_loss(model, ids.to(model.device)).cpu().numpy()
            h5io.mark_complete(h5)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m saeflow.activations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("cache", "loss"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="local HF folder or model id")
        p.add_argument("--tokens", required=True, help="tokens file from saeflow.data")
        p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
        p.add_argument("--dtype", default="float32", help="model dtype")
        p.add_argument("--model-name", default="", help="recorded in the output attributes")
        p.add_argument("--corpus", default="", help="recorded in the output attributes")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
        p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    cache = sub.choices["cache"]
    cache.add_argument("--site", action="append", required=True, help="e.g. blocks.3.hook_resid_post")
    cache.add_argument("--out", action="append", required=True, help="one output per --site")
    cache.add_argument("--skip-positions", type=int, default=1, help="leading positions dropped")
    cache.add_argument("--chunk-tokens", type=int, default=4096, help="HDF5 chunk length")
    sub.choices["loss"].add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "cache" and len(args.site) != len(args.out):
        parser.error(f"got {len(args.site)} --site but {len(args.out)} --out; give one --out per --site")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    attrs = {"model": args.model_name or Path(args.model).name, "corpus": args.corpus}
    if args.command == "cache":
        outputs = dict(zip(args.site, args.out))
        cache_activations(args.model, args.tokens, outputs, args.batch_size,
                          args.skip_positions, args.chunk_tokens, attrs, args.dtype, args.device)
    else:
        cache_loss(args.model, args.tokens, args.out, args.batch_size, attrs, args.dtype,
                   args.device)


if __name__ == "__main__":
    main()
