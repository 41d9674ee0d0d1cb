"""Sharded training on 8 simulated CPU devices, and Orbax checkpoint/resume across processes.

The checks themselves run in subprocesses (tests/sharded_worker.py) because the device count
is fixed when JAX starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set only in
the subprocess' environment, so the rest of the test suite keeps its single device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from tests.common import run_on_8_cpu_devices

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_worker.py"


def _run_worker(phase: str, out: Path) -> None:
    run_on_8_cpu_devices(WORKER, phase, str(out))


@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    _run_worker("first", out)
    _run_worker("resume", out)  # a fresh process: nothing survives but the checkpoint files
    return out


def _results(out: Path) -> dict[str, Any]:
    results = json.loads((out / "results.json").read_text())
    results.update(json.loads((out / "resume.json").read_text()))
    return results


CHECKS = [
    "device_count",
    *(
        f"{kind}/{axis}/{name}"
        for kind in ("eager_init", "eager_init_in_mesh", "jit_init_state_sharding")
        for axis in ("explicit", "auto")
        for name in (
            "rmsprop",
            "rmsprop_centered_momentum_schedule",
            "adamw",
            "inject_hyperparams",
            "chain_with_optax",
            "masked",
            "multisteps",
            "sgd_nesterov",
            "adagrad",
            "adadelta",
            "rprop",
            "torch_rmsprop",
            "keras_adam",
        )
    ),
    *(
        f"state_sharding_from_shapes/{axis}/{name}"
        for axis in ("explicit", "auto")
        for name in ("rmsprop", "adamw", "inject_hyperparams")
    ),
    "jit_init_no_out_shardings/explicit",
    "nnx_optimizer_eager_init/auto",
    "per_device_bytes/explicit",
    "per_device_bytes/auto",
    "trajectory_vs_single_device/explicit",
    "trajectory_vs_single_device/auto",
    "restore_into_momentum_added_fails",
    "restore_into_momentum_removed_fails",
    "restored_step",
]


@pytest.mark.parametrize("check", CHECKS)
def test_sharded(worker_dir: Path, check: str) -> None:
    results = _results(worker_dir)
    assert check in results, f"worker did not run {check}"
    ok, detail = results[check]
    assert ok, detail


def test_resume_is_bit_identical(worker_dir: Path) -> None:
    """10 steps straight == 5 steps, save, restore in a fresh process, 5 steps: bit for bit."""
    straight = np.load(worker_dir / "straight.npz")
    resumed = np.load(worker_dir / "resumed.npz")
    assert sorted(straight.files) == sorted(resumed.files)
    counts = [k for k in straight.files if k.endswith(".count")]
    # the schedule's position (plain RMSProp keeps no count, as in optax)
    assert len(counts) >= 1
    for key in straight.files:
        a, b = straight[key], resumed[key]
        assert a.dtype == b.dtype, key
        np.testing.assert_array_equal(
            np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8), err_msg=key
        )
    for key in counts:
        assert int(resumed[key]) == 10, key
