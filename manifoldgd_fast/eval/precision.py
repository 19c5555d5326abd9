"""Evaluation precision: bf16 autocast with channels_last and cudnn.benchmark on CUDA (the default,
fast), or fp32 as the release, with deterministic algorithms (``--precision``). On the CPU every
setting is fp32 and these are no-ops."""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import ConfigError

PRECISIONS = ("bf16", "fp32")


def amp(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA under ``precision`` bf16; nothing otherwise."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_net(model: torch.nn.Module, device: torch.device, precision: str = "bf16") -> torch.nn.Module:
    """``model`` on ``device``, channels_last where the inputs will be (:func:`net_layout`)."""
    model = model.to(device)
    # channels_last only with bf16: fp32 runs the release's NCHW layout
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" and precision == "bf16" else model


def net_layout(x: torch.Tensor, precision: str = "bf16") -> torch.Tensor:
    """A net input batch in the layout :func:`prepare_net` gave the net."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and precision == "bf16" else x


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: must be one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def numerics(device: torch.device, precision: str):
    """cuDNN / determinism settings of a run, restored afterwards.

    bf16 (CUDA): cudnn.benchmark on (fastest kernels, which may differ from run to
    run). fp32: benchmark off, cudnn.deterministic and torch's deterministic
    algorithms (warn-only: an op without a deterministic kernel warns instead of
    failing), cuBLAS's fixed workspace unless $CUBLAS_WORKSPACE_CONFIG is set.
    """
    cudnn = torch.backends.cudnn
    old = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    set_env = False
    try:
        if device.type == "cuda" and precision == "bf16":
            cudnn.benchmark = True
        elif device.type == "cuda":
            cudnn.benchmark, cudnn.deterministic = False, True
            if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read when cuBLAS makes a handle
                set_env = True
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = old[0], old[1]
        torch.use_deterministic_algorithms(old[2], warn_only=old[3])
        if set_env:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def describe_precision(device: torch.device, precision: str) -> str:
    if device.type != "cuda":
        return "fp32"
    if precision == "bf16":
        return "bf16 autocast, channels_last, cudnn.benchmark"
    return "fp32, cudnn.benchmark off, deterministic algorithms (warn-only)"
