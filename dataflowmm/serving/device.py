"""Device and dtype choices shared by every serving class."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_devices(device: str | Sequence[str] | None = None) -> list[str]:
    """Devices to hold one model replica each: every visible GPU, else the CPU.

    `device` pins a single device ("cpu", "cuda", "cuda:1"), or a list gives the devices
    themselves, one replica each (`["cuda:0", "cuda:2"]`; `["cpu", "cpu"]` runs two CPU
    replicas, as tests do to take the multi-replica path without a GPU).
    """
    check_device(device)
    if isinstance(device, str):
        return [device]
    if device is not None:
        return list(device)
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def check_device(device: Any) -> None:
    """ValueError unless `device` is None, a device name or a non-empty list of device names."""
    if device is None or _is_device_name(device):
        return
    if isinstance(device, (list, tuple)) and device and all(_is_device_name(name) for name in device):
        return
    raise ValueError(
        'device must be a device name ("cpu", "cuda:1"), a non-empty list of them (one model '
        'replica each, e.g. ["cuda:0", "cuda:1"]) or None for every visible GPU, got ' + repr(device)
    )


def _is_device_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def resolve_dtype(torch_dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Map "fp32"/"fp16"/"bf16"/"auto" (or a torch.dtype) to a torch.dtype.

    "auto" (and None) means bfloat16 on CUDA and float32 on CPU, where half
    precision is slow or unsupported.
    """
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return _DTYPES[str(torch_dtype).lower()]
    except KeyError:
        raise ValueError(
            f"torch_dtype must be one of fp32, fp16, bf16 or auto, got {torch_dtype!r}"
        ) from None


def free_memory() -> None:
    """Return cached allocator memory to the system after models are dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
