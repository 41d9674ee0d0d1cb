"""Stored (quantized / stochastically rounded) moments on 8 CPU devices; run by
tests/test_storage_sharding.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

``python storage_sharded_worker.py train OUT``: for each storage, runs 6 steps of centered
RMSProp with momentum (every moment stored) on one device and sharded over 8, writes the
comparison, the shardings, the bytes per device and the collectives of the compiled step to
OUT/<storage>.json, and an Orbax checkpoint after step 3 plus the final leaves of the sharded
run. ``resume OUT``: a fresh process restores the checkpoint (sharded) and runs steps 4-6.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsjax
from rmsjax.storage import is_stored

STORAGES = {
    "q8": rmsjax.quantized(8),
    "q4": rmsjax.quantized(4),
    "sr": rmsjax.stochastic_rounding(),
    "f8": rmsjax.float8(),
}
SPECS = {"rows": P("x", None), "cols": P(None, "x"), "bias": P()}
STEPS, SAVE_AT = 6, 3
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def host_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        # sharded along the leading axis; rows of 300 = one block of 256 and a short one
        "rows": rng.normal(size=(64, 300)).astype(np.float32),
        # sharded along the last axis, 256 entries (one block) per shard
        "cols": rng.normal(size=(16, 8 * 256)).astype(np.float32),
        # below the minimum size: float32 state, replicated
        "bias": rng.normal(size=(300,)).astype(np.float32),
    }


def host_grads() -> list[dict[str, np.ndarray]]:
    params = host_params()
    return [
        {k: np.sin(v * (t + 1)).astype(np.float32) * (1 + t) for k, v in params.items()}
        for t in range(STEPS)
    ]


def optimizer(storage: Any) -> Any:
    return rmsjax.rmsprop(
        1e-2,
        centered=True,
        momentum=0.9,
        nu_dtype=storage,
        mu_dtype=storage,
        momentum_dtype=storage,
    )


def place(tree: dict[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:
    return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()}


def steps(opt: Any, params: Any, state: Any, grads: list[Any]) -> tuple[Any, Any]:
    update = jax.jit(opt.update)
    for g in grads:
        u, state = update(g, state, params)
        params = rmsjax.apply_updates(params, u)
    return params, state


def hexes(tree: Any) -> list[str]:
    return [np.asarray(x).tobytes().hex() for x in jax.tree.leaves(tree)]


def device0_bytes(tree: Any) -> int:
    dev = jax.devices()[0]
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == dev
    )


def specs_of(state: Any) -> dict[str, str]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        sharding = leaf.sharding
        spec = sharding.spec if isinstance(sharding, NamedSharding) else "single"
        out[jax.tree_util.keystr(path)] = str(spec)
    return out


def train(out: Path, mesh: Any) -> None:
    grads = host_grads()
    for name, storage in STORAGES.items():
        opt = optimizer(storage)
        # one device, no sharding
        p1 = jax.tree.map(jnp.asarray, host_params())
        p1, s1 = steps(opt, p1, opt.init(p1), [jax.tree.map(jnp.asarray, g) for g in grads])
        # eight devices: state placed by state_sharding, sharded gradients
        params = place(host_params(), mesh)
        shardings = rmsjax.state_sharding(opt, params)
        state = jax.jit(opt.init, out_shardings=shardings)(params)
        placed = [place(g, mesh) for g in grads]
        init_bytes = device0_bytes(state)
        hlo = jax.jit(opt.update).lower(placed[0], state, params).compile().as_text()
        p8, s8 = steps(opt, params, state, placed[:SAVE_AT])
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(out / f"ckpt_{name}", {"params": p8, "state": s8})
        ckpt.wait_until_finished()
        p8, s8 = steps(opt, p8, s8, placed[SAVE_AT:])
        stored = [x for x in jax.tree.leaves(s8, is_leaf=is_stored) if is_stored(x)]
        result = {
            "same_as_one_device": hexes((p1, s1)) == hexes((p8, s8)),
            "n_stored": len(stored),
            "device0_bytes": init_bytes,
            "total_bytes": sum(x.nbytes for x in jax.tree.leaves(s1)),
            "specs": specs_of(s8),
            "collectives": sum(hlo.count(op) for op in COLLECTIVES),
            "final": hexes((p8, s8)),
        }
        (out / f"{name}.json").write_text(json.dumps(result))


def resume(out: Path, mesh: Any) -> None:
    grads = [place(g, mesh) for g in host_grads()]
    for name, storage in STORAGES.items():
        opt = optimizer(storage)
        params = place(host_params(), mesh)
        shardings = rmsjax.state_sharding(opt, params)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(opt.init, params),
            shardings,
        )
        restored = ocp.StandardCheckpointer().restore(
            out / f"ckpt_{name}", {"params": params, "state": abstract}
        )
        p, s = steps(opt, restored["params"], restored["state"], grads[SAVE_AT:])
        (out / f"{name}_resumed.json").write_text(json.dumps({"final": hexes((p, s))}))


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    {"train": train, "resume": resume}[phase](out, mesh)


if __name__ == "__main__":
    main()
