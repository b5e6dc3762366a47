"""Which floating-point arithmetic a job ran on: the processor and the torch build that decide its rounding.

The same job on one torch thread gives the same bits wherever this string is the same; under another one (another
CPU model, another torch, a GPU) its numbers may differ by rounding, which chaotic training (float32 networks trained
for thousands of steps) can amplify well past it. :mod:`fragile.run.verify` expects *identical* under the same
arithmetic and allows *close* under another.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def _cpu_fields(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


@functools.cache
def cpu_model() -> str:
    """The processor as its vendor, family, model and stepping name it (``AuthenticAMD family 25 model 17 stepping 1
    (AMD EPYC)``: a hypervisor may mask the marketing name, not these), or :func:`platform.processor` where there is
    no ``/proc/cpuinfo``."""
    fields = _cpu_fields(CPUINFO.read_text()) if CPUINFO.is_file() else {}
    if "vendor_id" not in fields:
        return platform.processor() or platform.machine() or "unknown CPU"
    ids = " ".join(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    name = f" ({fields['model name']})" if "model name" in fields else ""
    return f"{fields['vendor_id']} {ids}{name}"


def machine_arithmetic(device: str) -> str:
    """The arithmetic a job on ``device`` (``cpu`` or ``cuda``) gets on this machine: for a CPU, its model and the
    vector instructions torch dispatches to; for CUDA, the GPU and the CUDA version; both with torch's version."""
    if device == "cuda":
        return f"cuda {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"cpu {cpu_model()} {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"
