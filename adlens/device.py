"""The one reading of every script's `--device`: auto | cpu | cuda, checked before any work.

    >>> from adlens.device import resolve_device
    >>> resolve_device("auto")            # cuda when this machine has a CUDA device, else cpu
    device(type='cpu')

`--device cuda` on a machine without CUDA is a user error (exit 2): a run never falls back to the
CPU silently while its recorded config says "cuda".
"""

from __future__ import annotations

from adlens.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name) -> str:
    """`name` if it is one of DEVICES; a UserError otherwise (without asking torch about the machine)."""
    if name not in DEVICES:
        raise UserError(f"--device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {name!r}")
    return name


def resolve_device(name):
    """auto | cpu | cuda -> a torch.device; cuda is refused where no CUDA device is available."""
    import torch

    check_device_name(name)
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this machine has no CUDA device (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def describe_device(device) -> str:
    """What a timing ran on: the CPU with its core and torch thread counts, or the CUDA device's name."""
    import os
    import platform

    import torch

    if device.type == "cpu":
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return torch.cuda.get_device_name(device)
