"""Shared test fixtures: a mixed pytree, a loss over it, a jitted trajectory runner, and a runner
for worker scripts on 8 simulated CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

# JAX's x64 switch as a context manager: jax.enable_x64 from jax 0.8, jax.experimental.enable_x64
# before (the oldest supported jax, which the floor CI job runs, has only that one).
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:  # pragma: no cover - jax < 0.8
    from jax.experimental import enable_x64  # noqa: F401


def mixed_tree(seed: int = 0, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Dicts, tuples, a scalar, a vector, a matrix and a 3-D leaf."""
    rng = np.random.default_rng(seed)
    leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype=dtype)
    return {
        "scalar": leaf(),
        "layer": {"w": leaf(4, 3), "b": leaf(3)},
        "pair": (leaf(2, 3, 2), leaf(5)),
    }


def loss(params: Any) -> jax.Array:
    """A smooth non-quadratic loss, so trajectories depend on every step being right."""
    total = jnp.zeros((), jnp.float32)
    for i, leaf in enumerate(jax.tree.leaves(params)):
        x = leaf.astype(jnp.float32)
        total = total + jnp.sum((x - 0.3 * (i + 1)) ** 2 * (1.5 + jnp.sin(x)))
    return total


def trajectory(
    opt: Any,
    params: Any,
    steps: int = 20,
    loss_fn: Callable[[Any], jax.Array] = loss,
    apply: Callable[[Any, Any], Any] | None = None,
) -> list[Any]:
    """Parameters after each of ``steps`` jitted steps (one compiled scan)."""
    import optax

    apply = apply or optax.apply_updates

    def step(carry: Any, _: Any) -> tuple[Any, Any]:
        p, s = carry
        g = jax.grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        p = apply(p, u)
        return (p, s), p

    @jax.jit
    def run(p: Any) -> Any:
        _, ps = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return ps

    stacked = jax.tree.map(np.asarray, run(params))  # one transfer; slicing below is NumPy's
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(steps)]


def assert_trees_close(actual: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same structure, shapes and dtypes, and every leaf close (chex's tree assertions)."""
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_trees_all_equal_dtypes(actual, expected)
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


ROOT = Path(__file__).resolve().parents[1]


def run_on_8_cpu_devices(worker: Path, *args: str) -> None:
    """Run ``python worker *args`` in a fresh process with 8 host CPU devices (XLA's
    ``--xla_force_host_platform_device_count``), from the repository root; fail with its output
    unless it exits 0. The device count must be set before JAX starts, hence the process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, str(worker), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"{worker.name} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
