"""Which torch device a stage runs on.

Rules that declare ``gpu=1`` pass ``--device auto``: on a GPU node (SLURM sets
``CUDA_VISIBLE_DEVICES`` to the GPU it granted) that is ``cuda``, on a laptop or a CPU-only node
``cpu``. The device is deliberately not a rule parameter: moving a run from CPU to GPU must not
make finished results look stale.
"""

from __future__ import annotations

DEVICE_HELP = "torch device: auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1, ..."


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; anything else is checked, so a typo or a missing GPU fails
    at start-up with the value named rather than at the first tensor moved."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a torch device ({DEVICE_HELP})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is visible to this process")
    return name
