"""Device names from the CLI / config -> torch devices, with errors naming --device."""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:1`` -> a device with its index (tensors compare equal to it)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {name!r}") from None
    if dev.type not in ("cpu", "cuda"):  # (mps, xla, meta...: torch names them, nothing here runs on them)
        raise ConfigError(f"--device {name}: runs on cpu or cuda[:N], not on {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return dev
