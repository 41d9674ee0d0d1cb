"""What every benchmark reports the same way: the one-line description of the machine its results
start with (:func:`describe`), and the peak memory of a compiled step (:func:`peak_bytes`)."""

from __future__ import annotations

import os
import platform
from typing import Any

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


def peak_bytes(compiled: Any) -> int:
    """The peak memory of a compiled step by XLA's memory analysis: arguments + outputs -
    aliased (donated buffers reused for outputs) + temporaries, in bytes."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
