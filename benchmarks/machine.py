"""The one-line description of the machine that every benchmark's results start with."""

from __future__ import annotations

import os
import platform

import jax


def describe() -> str:
    """CPU model, core count and JAX's device platforms, e.g. ``"Intel(R) Xeon(R) Processor,
    2 cores, jax devices: cpu"``."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = ", ".join(sorted({d.platform for d in jax.devices()}))
    return f"{model}, {os.cpu_count()} cores, jax devices: {devices}"
