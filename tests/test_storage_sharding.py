"""Stored moments of sharded parameters (8 simulated CPU devices, in subprocesses).

tests/storage_sharded_worker.py runs centered RMSProp with momentum, every moment quantized
(8 or 4 bits) or stochastically rounded, on parameters sharded along a leading axis, along the
last axis (one block per shard) and replicated (a small one, float32 state). The device count
is fixed when JAX starts, so the worker runs with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in its own process; a second, fresh
process restores the Orbax checkpoint written by the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("orbax.checkpoint")

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "storage_sharded_worker.py"
STORAGES = ("q8", "q4", "sr")


def _run(phase: str, out: Path) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, str(WORKER), phase, str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"worker {phase} failed:\n{proc.stderr[-4000:]}"


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


@pytest.mark.parametrize("storage", STORAGES)
def test_eight_devices_equal_one_bit_for_bit(results: dict[str, Any], storage: str) -> None:
    """The sharded trajectory (parameters and every state array) is the single-device one:
    the blocks never leave a shard, so each entry sees the same arithmetic."""
    assert results[storage]["same_as_one_device"]
    assert results[storage]["n_stored"] == (6 if storage != "sr" else 9)


@pytest.mark.parametrize("storage", STORAGES)
def test_codes_scales_and_values_are_sharded_with_their_parameter(
    results: dict[str, Any], storage: str
) -> None:
    specs = results[storage]["specs"]
    for moment in ("[0].mu", "[0].nu", "[2].trace"):
        if storage == "sr":
            assert specs[f"{moment}['rows'].data[0]"] == "P('x',)"
            assert specs[f"{moment}['cols'].data[0]"] == "P(None, 'x')"
            assert specs[f"{moment}['rows'].data[1]"] == "P()"  # the PRNG key
        else:
            for part in ("codes", "scales"):
                assert specs[f"{moment}['rows'].data.{part}"] == "P('x',)"
                assert specs[f"{moment}['cols'].data.{part}"] == "P(None, 'x')"
        assert specs[f"{moment}['bias']" + (".data[0]" if storage == "sr" else "")] == "P()"
    # elementwise and block-local: the compiled step communicates nothing
    assert results[storage]["collectives"] == 0


@pytest.mark.parametrize("storage", STORAGES)
def test_state_bytes_per_device_fall_with_the_device_count(
    results: dict[str, Any], storage: str
) -> None:
    """Device 0 holds an eighth of the sharded state plus the small replicated arrays (the
    float32 state of the 300-entry bias, 3.6 kB, keys and counts)."""
    r = results[storage]
    replicated = 3 * 300 * (4 if storage != "sr" else 2) + 2048
    assert r["device0_bytes"] <= r["total_bytes"] / 8 + replicated
    assert r["device0_bytes"] < r["total_bytes"] / 5


@pytest.mark.parametrize("storage", STORAGES)
def test_orbax_checkpoint_resumes_bit_for_bit_in_a_fresh_process(
    results: dict[str, Any], storage: str
) -> None:
    assert results[storage]["resumed"] == results[storage]["final"]
