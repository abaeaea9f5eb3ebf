"""Device and dtype choices shared by every serving class."""

from __future__ import annotations

import gc

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_devices(device: str | None = None) -> list[str]:
    """Devices to hold one model replica each: every visible GPU, else the CPU.

    `device` pins a single device ("cpu", "cuda", "cuda:1").
    """
    if device is not None:
        return [device]
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


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
