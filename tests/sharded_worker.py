"""Multi-device checks run in a subprocess with 8 simulated CPU devices (see test_sharding.py).

``python tests/sharded_worker.py first OUT_DIR``: sharding checks, the 10-step and 5-step runs,
checkpoints; writes ``OUT_DIR/results.json`` and ``OUT_DIR/straight.npz``.
``python tests/sharded_worker.py resume OUT_DIR``: in a fresh process, restores the 5-step
checkpoint, trains 5 more steps, writes ``OUT_DIR/resumed.npz``; tries the mismatched restores.

Each check records ``[passed, detail]`` under its name in the JSON file, so that the pytest side
reports every check separately instead of stopping at the first failure.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsjax
import rmsjax.compat.keras
import rmsjax.compat.pytorch

ROOT = Path(__file__).resolve().parents[1]
N_DEVICES = 8
STEPS = 10
MOMENTUM = 0.9


@functools.cache
def reference() -> list[list[np.ndarray]]:
    """Params and state leaves after each of STEPS steps of the single-device run."""
    single = load_example().Run(None, momentum=MOMENTUM)
    out = []
    for _ in range(STEPS):
        single.train(1)
        out.append([np.asarray(x) for x in jax.tree.leaves((single.params, single.opt_state))])
    return out


@functools.cache
def load_example() -> Any:
    path = ROOT / "examples" / "sharded_training.py"
    spec = importlib.util.spec_from_file_location("sharded_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def optimizers() -> dict[str, Any]:
    lr = optax.exponential_decay(0.01, 5, 0.5)
    return {
        "rmsprop": rmsjax.rmsprop(0.01),
        "rmsprop_centered_momentum_schedule": rmsjax.rmsprop(lr, centered=True, momentum=0.9),
        "adamw": rmsjax.adamw(lr),
        "inject_hyperparams": optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=0.01),
        "chain_with_optax": optax.chain(optax.clip_by_global_norm(1.0), rmsjax.rmsprop(0.01)),
        "masked": optax.masked(
            rmsjax.rmsprop(0.01, momentum=0.9), {"w1": True, "b1": False, "w2": True, "b2": False}
        ),
        "multisteps": optax.MultiSteps(rmsjax.rmsprop(0.01, centered=True), 4),
        "sgd_nesterov": rmsjax.sgd(lr, momentum=0.9, nesterov=True),
        "adagrad": rmsjax.adagrad(0.01),
        "adadelta": rmsjax.adadelta(1.0, weight_decay=1e-4),
        "rprop": rmsjax.rprop(0.01),
        "torch_rmsprop": rmsjax.compat.pytorch.rmsprop(lr=0.01, momentum=0.9, centered=True),
        "keras_adam": rmsjax.compat.keras.adam(),
    }


def expected_shardings(opt: Any, params: Any, state: Any, mesh: Any) -> Any:
    """Independently of rmsjax.state_sharding: optax's own map over the param-shaped subtrees."""
    shardings = jax.tree.map(lambda p: p.sharding, params)
    replicated = NamedSharding(mesh, P())
    marked = optax.tree_utils.tree_map_params(
        opt, lambda leaf: "param", state, transform_non_params=lambda leaf: "other"
    )
    # Replace each param-shaped subtree of "param" markers by the parameters' shardings.
    out = _map_subtrees(marked, jax.tree.structure(params), shardings)
    return jax.tree.map(lambda m: replicated if m == "other" else m, out)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _map_subtrees(marked: Any, param_def: Any, shardings: Any) -> Any:
    """Put the params' shardings where ``marked`` has a param-shaped subtree of "param" marks.

    ``optax.masked`` leaves ``MaskedNode``s where a parameter is masked out; they are kept.
    """
    if jax.tree.structure(marked, is_leaf=_is_masked) == param_def and all(
        m == "param" for m in jax.tree.leaves(marked)
    ):
        return jax.tree.map(
            lambda m, sh: m if _is_masked(m) else sh, marked, shardings, is_leaf=_is_masked
        )
    if not jax.tree_util.all_leaves([marked]):
        children, treedef = jax.tree_util.tree_flatten(marked, is_leaf=lambda x: x is not marked)
        return treedef.unflatten([_map_subtrees(c, param_def, shardings) for c in children])
    return marked


def same_sharding(a: Any, b: Any, ndim: int) -> bool:
    return a.is_equivalent_to(b, ndim)


def check_state_shardings(state: Any, expected: Any, *, scalars: bool) -> tuple[bool, str]:
    bad = []
    for (path, leaf), want in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(expected), strict=True
    ):
        is_param_like = not want.is_fully_replicated or leaf.ndim > 0
        if not scalars and not is_param_like:
            continue
        if not same_sharding(leaf.sharding, want, leaf.ndim):
            bad.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding} != {want}")
    return not bad, "; ".join(bad) or "ok"


def record(results: dict[str, Any], name: str, fn: Any) -> None:
    import time

    t0 = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception:
        ok, detail = False, traceback.format_exc()
    results[name] = [bool(ok), detail]
    print(f"{time.perf_counter() - t0:6.2f} s  {name}", file=sys.stderr)


def flat(tree: Any) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def first(out: Path) -> None:
    ex = load_example()
    results: dict[str, Any] = {"device_count": [jax.device_count() == N_DEVICES, "devices"]}
    for axis_type in ("explicit", "auto"):
        mesh = ex.make_mesh(axis_type)
        host = ex.init_params()
        params = {k: jax.device_put(v, NamedSharding(mesh, ex.SPECS[k])) for k, v in host.items()}
        for name, opt in optimizers().items():
            tag = f"{axis_type}/{name}"
            state = opt.init(params)
            expected = expected_shardings(opt, params, state, mesh)
            record(
                results,
                f"eager_init/{tag}",
                lambda s=state, e=expected: check_state_shardings(s, e, scalars=False),
            )
            with jax.set_mesh(mesh):
                state_m = opt.init(params)
            record(
                results,
                f"eager_init_in_mesh/{tag}",
                lambda s=state_m, e=expected, a=axis_type: check_state_shardings(
                    s, e, scalars=a == "explicit"
                ),
            )

            def jitted(opt: Any = opt, expected: Any = expected, params=params, mesh=mesh) -> Any:
                out_shardings = rmsjax.state_sharding(opt, params)
                with jax.set_mesh(mesh):
                    s = jax.jit(opt.init, out_shardings=out_shardings)(params)
                return check_state_shardings(s, expected, scalars=True)

            record(results, f"jit_init_state_sharding/{tag}", jitted)

            def abstract(opt: Any = opt, expected: Any = expected, params=params) -> Any:
                shapes = jax.tree.map(
                    lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params
                )
                got = rmsjax.state_sharding(opt, shapes)
                bad = [
                    f"{g} != {e}"
                    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
                    if g != e
                ]
                return not bad, "; ".join(bad) or "ok"

            record(results, f"state_sharding_from_shapes/{tag}", abstract)

        if axis_type == "explicit":

            def jit_plain(params: Any = params, mesh: Any = mesh) -> Any:
                opt = optimizers()["rmsprop_centered_momentum_schedule"]
                with jax.set_mesh(mesh):
                    s = jax.jit(opt.init)(params)
                e = expected_shardings(opt, params, s, mesh)
                return check_state_shardings(s, e, scalars=True)

            record(results, "jit_init_no_out_shardings/explicit", jit_plain)

        def bytes_check(axis_type: str = axis_type) -> tuple[bool, str]:
            run = ex.Run(ex.make_mesh(axis_type), momentum=0.9)
            lines, ok = [], True
            for (path, leaf), p_spec in _state_leaves_with_param_spec(run, ex):
                if p_spec is None or all(s is None for s in p_spec):
                    continue  # replicated parameter or scalar: not fully sharded
                sizes = {shard.data.nbytes for shard in leaf.addressable_shards}
                n_shards = len(leaf.addressable_shards)
                good = sizes == {leaf.nbytes // N_DEVICES} and n_shards == N_DEVICES
                ok &= good
                lines.append(f"{jax.tree_util.keystr(path)}: {leaf.nbytes} B, shards {sizes}")
            return ok and bool(lines), "; ".join(lines)

        record(results, f"per_device_bytes/{axis_type}", bytes_check)

        def trajectory(axis_type: str = axis_type) -> tuple[bool, str]:
            # The 8-device run against the single-device run, after every step. The Explicit run
            # doubles as the "10 steps straight" run of the checkpoint test: it saves a
            # checkpoint after step 5 (saving only reads the arrays) and goes on to step 10.
            sharded = ex.Run(ex.make_mesh(axis_type), momentum=MOMENTUM)
            worst, losses = 0.0, []
            for i, expected in enumerate(reference()):
                losses.append(sharded.train(1)[0])
                got = jax.tree.leaves((sharded.params, sharded.opt_state))
                for a, b in zip(got, expected, strict=True):
                    a = np.asarray(a)
                    if a.dtype.kind == "f":
                        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
                        worst = max(worst, float(np.max(np.abs(a - b))))
                    else:
                        np.testing.assert_array_equal(a, b)
                if axis_type == "explicit" and i + 1 == STEPS // 2:
                    sharded.save(str(out / "ckpt"))
            if axis_type == "explicit":
                state = {"params": sharded.params, "state": sharded.opt_state}
                np.savez(out / "straight.npz", **flat(state))
            ok = losses[-1] < losses[0]
            return ok, f"max abs difference {worst:.2e}; loss {losses[0]:.4f} -> {losses[-1]:.4f}"

        record(results, f"trajectory_vs_single_device/{axis_type}", trajectory)

    record(results, "nnx_optimizer_eager_init/auto", lambda: nnx_check(ex))

    # A checkpoint of an optimizer without momentum, for the mismatched-restore checks.
    ex.Run(ex.make_mesh("explicit"), momentum=None).save(str(out / "ckpt_plain"))
    (out / "results.json").write_text(json.dumps(results, indent=1))


def nnx_check(ex: Any) -> tuple[bool, str]:
    """nnx.Optimizer on a sharded NNX model: eager state and state_sharding follow the params."""
    from flax import nnx

    mesh = ex.make_mesh("auto")
    model = nnx.Linear(ex.IN, ex.HIDDEN, rngs=nnx.Rngs(0))
    specs = {"kernel": P(None, ex.AXIS), "bias": P(ex.AXIS)}
    for name, spec in specs.items():
        variable = getattr(model, name)
        variable.set_value(jax.device_put(variable.get_value(), NamedSharding(mesh, spec)))
    tx = rmsjax.rmsprop(0.01, momentum=0.9, bias_correction=True)  # a count to replicate
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shardings = rmsjax.state_sharding(tx, nnx.state(model, nnx.Param))
    bad = []
    for buffer in ("nu", "trace"):
        part = 0 if buffer == "nu" else 2
        for name, spec in specs.items():
            leaf = getattr(optimizer.opt_state[part], buffer)[name].get_value()
            want = NamedSharding(mesh, spec)
            if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
                bad.append(f"{buffer}.{name}: {leaf.sharding.spec} != {spec}")
            computed = getattr(shardings[part], buffer)[name].get_value()
            if not computed.is_equivalent_to(want, leaf.ndim):
                bad.append(f"state_sharding {buffer}.{name}: {computed} != {want}")
    if not shardings[0].count.is_fully_replicated:
        bad.append(f"state_sharding count: {shardings[0].count}")
    return not bad, "; ".join(bad) or "ok"


def _state_leaves_with_param_spec(run: Any, ex: Any) -> list[tuple[Any, Any]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(run.opt_state)[0]:
        last = path[-1]
        key = getattr(last, "key", None)
        out.append(((path, leaf), ex.SPECS.get(key) if leaf.ndim else None))
    return out


def resume(out: Path) -> None:
    ex = load_example()
    results: dict[str, Any] = {}
    mesh = ex.make_mesh("explicit")

    def mismatch(momentum: float | None, directory: str) -> tuple[bool, str]:
        run = ex.Run(mesh, momentum=momentum)
        try:
            run.restore(str(out / directory))
        except ValueError as err:
            return "does not fit this run" in str(err), str(err)[:300]
        return False, "restored without error"

    record(results, "restore_into_momentum_added_fails", lambda: mismatch(0.9, "ckpt_plain"))
    record(results, "restore_into_momentum_removed_fails", lambda: mismatch(None, "ckpt"))
    run = ex.Run(mesh, momentum=MOMENTUM)
    run.restore(str(out / "ckpt"))
    results["restored_step"] = [run.step_count == STEPS // 2, str(run.step_count)]
    run.train(STEPS - run.step_count)
    np.savez(out / "resumed.npz", **flat({"params": run.params, "state": run.opt_state}))
    (out / "resume.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    {"first": first, "resume": resume}[sys.argv[1]](Path(sys.argv[2]))
