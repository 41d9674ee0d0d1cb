"""rmsjax.state_sharding and state_like's sharding on one device, plus scalars next to a
4-device mesh (in a subprocess; the 8-device checks are in test_sharding.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import SingleDeviceSharding

import rmsjax
from tests.common import mixed_tree


def test_structure_and_single_device_shardings() -> None:
    params = mixed_tree()
    opt = rmsjax.rmsprop(optax.exponential_decay(0.1, 5, 0.5), centered=True, momentum=0.9)
    shardings = rmsjax.state_sharding(opt, params)
    state = opt.init(params)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    device = jax.devices()[0]
    for sharding in jax.tree.leaves(shardings):
        assert sharding == SingleDeviceSharding(device)
    # The result is usable as out_shardings and gives the eager init's values.
    jitted = jax.jit(opt.init, out_shardings=shardings)(params)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_replicated_override_applies_to_non_param_leaves_only() -> None:
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    marker = SingleDeviceSharding(jax.devices()[0], memory_kind=None)
    shardings = rmsjax.state_sharding(rmsjax.adamw(0.1), params, replicated=marker)
    adam = shardings[0]
    assert adam.count is marker
    assert adam.mu["w"] is not marker and adam.mu["w"] == params["w"].sharding


def test_state_follows_param_dtype_policy_with_full_like() -> None:
    """state_like (jnp.full_like) keeps the documented dtypes: half -> float32, else kept."""
    params = {
        "h": jnp.ones(3, jnp.bfloat16),
        "f": jnp.ones(3, jnp.float32),
        "c": jnp.ones(3, jnp.complex64),
    }
    state = rmsjax.rmsprop(0.1, centered=True).init(params)[0]
    assert {k: v.dtype for k, v in state.nu.items()} == {
        "h": jnp.float32,
        "f": jnp.float32,
        "c": jnp.float32,  # second moment of a complex parameter is real
    }
    assert state.mu["c"].dtype == jnp.complex64
    assert not any(v.weak_type for v in jax.tree.leaves(state))


def test_params_without_sharding_raise() -> None:
    params = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(TypeError, match=r"\['w'\].*has no sharding"):
        rmsjax.state_sharding(rmsjax.rmsprop(0.1), params)


def test_python_scalar_leaf_gets_the_replicated_sharding() -> None:
    params = {"w": jnp.ones((3, 2)), "scale": 0.5}
    opt = rmsjax.adam(0.1)
    shardings = rmsjax.state_sharding(opt, params)
    device = SingleDeviceSharding(jax.devices()[0])
    assert shardings[0].mu["scale"] == device and shardings[0].count == device
    state = jax.jit(opt.init, out_shardings=shardings)(params)
    assert state[0].mu["scale"].shape == ()


# A 4-device CPU mesh needs its own process: the device count is fixed when JAX starts.
_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import rmsjax
mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
params = {
    "w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("d", None))),
    "py": 0.5,                  # a Python scalar
    "loose": jnp.float32(2.0),  # an uncommitted array on the default device
}
assert not params["loose"].committed
opt = rmsjax.rmsprop(0.1, centered=True, momentum=0.9, bias_correction=True)
shardings = rmsjax.state_sharding(opt, params)
replicated = NamedSharding(mesh, P())
rms = shardings[0]
assert rms.nu["w"] == params["w"].sharding, rms.nu["w"]
for leaf in (rms.count, rms.nu["py"], rms.mu["py"], rms.nu["loose"], shardings[2].trace["loose"]):
    assert leaf == replicated, leaf
state = jax.jit(opt.init, out_shardings=shardings)(params)  # one set of devices: compiles
assert state[0].nu["w"].sharding == params["w"].sharding
assert state[0].nu["loose"].sharding.is_fully_replicated
assert len(state[0].nu["loose"].sharding.device_set) == 4
print("ok")
"""


def test_scalars_next_to_a_four_device_mesh_are_replicated_on_it() -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
