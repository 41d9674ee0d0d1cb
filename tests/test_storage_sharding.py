"""Stored moments of sharded parameters (8 simulated CPU devices, in subprocesses).

tests/storage_sharded_worker.py runs centered RMSProp with momentum, every moment quantized
(8 or 4 bits, or FP8) or stochastically rounded, on parameters sharded along a leading axis,
along the last axis (one block per shard) and replicated (a small one, float32 state). The
device count is fixed when JAX starts, so the worker runs with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in its own process; a second, fresh
process restores the Orbax checkpoint written by the first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("orbax.checkpoint")

from tests.common import run_on_8_cpu_devices

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "storage_sharded_worker.py"
STORAGES = ("q8", "q4", "sr", "f8")


def _run(phase: str, out: Path) -> None:
    run_on_8_cpu_devices(WORKER, phase, str(out))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("storage_sharded")
    _run("train", out)
    _run("resume", out)
    found = {}
    for name in STORAGES:
        found[name] = json.loads((out / f"{name}.json").read_text())
        found[name]["resumed"] = json.loads((out / f"{name}_resumed.json").read_text())["final"]
    return found


def test_stored_moments_on_eight_devices(results: dict[str, Any]) -> None:
    """One test (the two worker processes run once, not once per xdist worker)."""
    for storage in STORAGES:
        r = results[storage]
        # The sharded trajectory (parameters and every state array) is the single-device one:
        # the blocks never leave a shard, so each entry sees the same arithmetic.
        assert r["same_as_one_device"], storage
        assert r["n_stored"] == (6 if storage != "sr" else 9), storage
        # Codes, scales and values are sharded with their parameter; keys are replicated.
        specs = r["specs"]
        # with 4-bit state, centered RMSProp keeps the variance itself (its variance form)
        second = "[0].var" if storage == "q4" else "[0].nu"
        for moment in ("[0].mu", second, "[2].trace"):
            if storage == "sr":
                assert specs[f"{moment}['rows'].data[0]"] == "P('x',)"
                assert specs[f"{moment}['cols'].data[0]"] == "P(None, 'x')"
                assert specs[f"{moment}['rows'].data[1]"] == "P()"  # the PRNG key
            else:
                for part in ("values", "scales") if storage == "f8" else ("codes", "scales"):
                    assert specs[f"{moment}['rows'].data.{part}"] == "P('x',)"
                    assert specs[f"{moment}['cols'].data.{part}"] == "P(None, 'x')"
                # 4-bit moments round stochastically: their (seed, counter) key is replicated
                # (the random bits index the whole array, so shards agree)
                key = f"{moment}['rows'].data.key"
                assert specs.get(key) == ("P()" if storage == "q4" else None)
            assert specs[f"{moment}['bias']" + (".data[0]" if storage == "sr" else "")] == "P()"
        # Elementwise and block-local: the compiled step communicates nothing.
        assert r["collectives"] == 0, storage
        # Device 0 holds an eighth of the sharded state plus the small replicated arrays (the
        # state of the 300-entry bias, keys and counts).
        replicated = 3 * 300 * (4 if storage != "sr" else 2) + 2048
        assert r["device0_bytes"] <= r["total_bytes"] / 8 + replicated, storage
        assert r["device0_bytes"] < r["total_bytes"] / 5, storage
        # An Orbax checkpoint restored in a fresh process resumes bit for bit.
        assert r["resumed"] == r["final"], storage
