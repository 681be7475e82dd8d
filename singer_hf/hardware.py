"""What the machine a run starts on can do: an accelerator, native bf16 on the CPU, usable cores."""

from __future__ import annotations

import os
from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
"""/proc/cpuinfo flags of native bf16 arithmetic: x86 AMX and AVX512-BF16, Arm's BF16 extension."""


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def native_cpu_bf16() -> bool | None:
    """Whether this CPU computes in bf16 natively, from /proc/cpuinfo; None where there is none to read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return bool(flags & set(CPU_BF16_FLAGS))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or a job scheduler's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
