"""Training across two JAX processes on one machine (see test_multiprocess.py).

Every phase trains ``examples/sharded_training.py``'s FSDP model (centered RMSProp with momentum
and a decaying learning rate) on a global 8-device mesh, and writes what it finds to ``OUT``:

``python -m tests.multiprocess_worker single OUT``
    One process with 8 CPU devices: the reference. ``STEPS`` steps on the 8-device mesh
    (``single8.npz``) and on one device (``single1.npz``).
``python -m tests.multiprocess_worker first OUT --coordinator 127.0.0.1:PORT --process-id I``
    Process ``I`` of 2, each with 4 CPU devices, joined by ``jax.distributed`` and gloo (the
    example's ``connect``). Checks ``rmsjax.state_sharding`` across the processes, trains
    ``STEPS // 2`` steps (each process feeding only its own rows of every batch), saves an Orbax
    checkpoint (``OUT/ckpt``), trains on to ``STEPS``; writes ``step5.npz`` and ``straight.npz``.
``python -m tests.multiprocess_worker resume OUT --coordinator ... --process-id I``
    A fresh pair of processes: restores the checkpoint (``restored.npz``) and trains on to
    ``STEPS`` (``resumed.npz``).

Values are gathered to the host with ``multihost_utils.process_allgather`` (a collective every
process joins) and written by process 0. Each process records ``[passed, detail]`` per check in
``OUT/<phase>-<I>.json``; an exception ends the process with a non-zero status instead, so the
launcher stops the other process at once rather than leaving it waiting in a collective (and
the failing process leaves at once, without waiting at jax.distributed's shutdown barrier).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

import rmsjax
from tests import sharded_worker as sw

N_PROCESSES = 2
LOCAL_DEVICES = 4
STEPS = 10
MOMENTUM = 0.9
# Optimizers whose state placement is checked across the processes (names in
# tests/sharded_worker.optimizers): a schedule's count, Adam's two moments and count, and
# inject_hyperparams' scalar hyperparameters, built from Python floats.
SHARDING_CASES = ("rmsprop_centered_momentum_schedule", "adamw", "inject_hyperparams")


def gathered(tree: Any) -> dict[str, np.ndarray]:
    """Every leaf's full value on the host, keyed by its key path (a collective)."""
    if jax.process_count() == 1:
        return sw.flat(tree)
    return sw.flat(multihost_utils.process_allgather(tree, tiled=True))


def save_npz(path: Path, tree: Any) -> None:
    values = gathered(tree)  # every process takes part; one writes
    if jax.process_index() == 0:
        np.savez(path, **values)


def placement(leaf: jax.Array, want: Sharding, mesh: jax.sharding.Mesh) -> list[str]:
    """What is wrong with where ``leaf`` lives: it should be sharded as ``want`` over all 8
    devices of ``mesh``, with this process holding its 4 local shards (1/8 of the leaf each
    when ``want`` splits it, whole copies when ``want`` replicates it)."""
    shards = leaf.addressable_shards
    want_bytes = leaf.nbytes if want.is_fully_replicated else leaf.nbytes // 8
    problems = []
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
        problems.append(f"sharding {leaf.sharding} != {want}")
    if leaf.sharding.device_set != set(mesh.devices.flat):
        problems.append(f"on {len(leaf.sharding.device_set)} devices, not the mesh's 8")
    if leaf.is_fully_addressable:
        problems.append("fully addressable from one process")
    if len(shards) != LOCAL_DEVICES or {s.device for s in shards} != set(jax.local_devices()):
        problems.append(f"local shards on devices {[s.device.id for s in shards]}")
    if {s.data.nbytes for s in shards} != {want_bytes}:
        problems.append(f"shard bytes {sorted({s.data.nbytes for s in shards})} != {want_bytes}")
    return problems


def check_placement(tree: Any, expected: Any, mesh: jax.sharding.Mesh) -> tuple[bool, str]:
    """``placement`` for every leaf of ``tree``; ``expected`` holds a Sharding per leaf."""
    bad = []
    for (path, leaf), want in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(expected), strict=True
    ):
        problems = placement(leaf, want, mesh)
        if problems:
            bad.append(f"{jax.tree_util.keystr(path)}: {', '.join(problems)}")
    return not bad, "; ".join(bad) or "ok"


def param_shardings(ex: Any, mesh: jax.sharding.Mesh) -> dict[str, Sharding]:
    return {k: NamedSharding(mesh, spec) for k, spec in ex.SPECS.items()}


def run_shardings(ex: Any, run: Any) -> tuple[Any, Any]:
    """Where a Run's params and state belong, found without rmsjax.state_sharding (which Run
    itself uses to place the state): the example's specs and optax's tree_map_params."""
    state = sw.expected_shardings(run.opt, run.params, run.opt_state, run.mesh)
    return param_shardings(ex, run.mesh), state


def same_shardings(got: Any, expected: Any) -> tuple[bool, str]:
    bad = [
        f"{jax.tree_util.keystr(path)}: {g} != {e}"
        for (path, g), e in zip(
            jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected), strict=True
        )
        if g != e
    ]
    return not bad, "; ".join(bad) or "ok"


def sharding_checks(record: Any) -> None:
    """rmsjax.state_sharding on parameters sharded over both processes' devices."""
    ex = sw.load_example()
    for axis_type in ("explicit", "auto"):
        mesh = ex.make_mesh(axis_type)
        host = ex.init_params()
        params = {k: jax.device_put(v, NamedSharding(mesh, ex.SPECS[k])) for k, v in host.items()}
        want = param_shardings(ex, mesh)
        record(f"params_span_both_processes/{axis_type}", *check_placement(params, want, mesh))
        optimizers = sw.optimizers()
        for name in SHARDING_CASES:
            opt: optax.GradientTransformation = optimizers[name]
            tag = f"{axis_type}/{name}"
            shardings = rmsjax.state_sharding(opt, params)
            with jax.set_mesh(mesh):
                state = jax.jit(opt.init, out_shardings=shardings)(params)
            expected = sw.expected_shardings(opt, params, state, mesh)
            record(f"state_sharding/{tag}", *same_shardings(shardings, expected))
            shapes = jax.tree.map(
                lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params
            )
            from_shapes = rmsjax.state_sharding(opt, shapes)
            record(f"state_sharding_from_shapes/{tag}", *same_shardings(from_shapes, expected))
            record(
                f"jit_init_sharding/{tag}", *sw.check_state_shardings(state, expected, scalars=True)
            )
            record(f"state_spans_both_processes/{tag}", *check_placement(state, expected, mesh))
            if axis_type == "explicit" and name == "inject_hyperparams":
                # State from an eager init (its count and hyperparameters are uncommitted
                # scalars on this process's first device) steps to the same values as state
                # from the jitted, placed init. (One case: each costs two compilations.)
                eager = opt.init(params)
                with jax.set_mesh(mesh):
                    step = jax.jit(opt.update, out_shardings=(None, shardings))
                    _, from_jit = step(params, state, params)
                    _, from_eager = step(params, eager, params)
                a, b = gathered(from_jit), gathered(from_eager)
                bad = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
                record(f"eager_init_steps_like_jit_init/{tag}", not bad, ", ".join(bad) or "ok")


def single(out: Path, record: Any) -> None:
    ex = sw.load_example()
    record("device_count", jax.device_count() == 8, f"{jax.device_count()} devices")
    sharded = ex.Run(ex.make_mesh("explicit"), momentum=MOMENTUM)
    sharded.train(STEPS)
    save_npz(out / "single8.npz", {"params": sharded.params, "state": sharded.opt_state})
    one = ex.Run(None, momentum=MOMENTUM)
    one.train(STEPS)
    save_npz(out / "single1.npz", {"params": one.params, "state": one.opt_state})


def first(out: Path, record: Any) -> None:
    topology = (jax.process_count(), jax.device_count(), jax.local_device_count())
    record("topology", topology == (N_PROCESSES, 8, LOCAL_DEVICES), f"{topology}")
    sharding_checks(record)

    ex = sw.load_example()
    mesh = ex.make_mesh("explicit")
    run = ex.Run(mesh, momentum=MOMENTUM)
    want = run_shardings(ex, run)
    record("run_spans_both_processes", *check_placement((run.params, run.opt_state), want, mesh))
    # Run.batch has each process pass only its rows; device_put is given the whole batch.
    x, y = run.host_batch(0)
    whole = (
        jax.device_put(x, NamedSharding(mesh, P(ex.AXIS, None))),
        jax.device_put(y, NamedSharding(mesh, P(ex.AXIS))),
    )
    a, b = gathered(run.batch(0)), gathered(whole)
    same = [a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in b]
    record("process_rows_batch_is_whole_batch", all(same) and len(same) == 2, f"{same}")
    losses = run.train(STEPS // 2)
    run.save(str(out / "ckpt"))
    save_npz(out / "step5.npz", {"params": run.params, "state": run.opt_state})
    losses += run.train(STEPS - STEPS // 2)
    record("loss_decreases", losses[-1] < losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    record(
        "trained_spans_both_processes", *check_placement((run.params, run.opt_state), want, mesh)
    )
    save_npz(out / "straight.npz", {"params": run.params, "state": run.opt_state})


def resume(out: Path, record: Any) -> None:
    ex = sw.load_example()
    mesh = ex.make_mesh("explicit")
    run = ex.Run(mesh, momentum=MOMENTUM)
    run.restore(str(out / "ckpt"))
    record("restored_step", run.step_count == STEPS // 2, str(run.step_count))
    want = run_shardings(ex, run)
    record(
        "restored_spans_both_processes", *check_placement((run.params, run.opt_state), want, mesh)
    )
    save_npz(out / "restored.npz", {"params": run.params, "state": run.opt_state})
    run.train(STEPS - run.step_count)
    save_npz(out / "resumed.npz", {"params": run.params, "state": run.opt_state})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=["single", "first", "resume"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (two-process phases)")
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()
    if args.phase != "single":
        sw.load_example().connect(args.coordinator, N_PROCESSES, args.process_id)

    results: dict[str, Any] = {}
    start = time.perf_counter()

    def record(name: str, ok: bool, detail: str) -> None:
        results[name] = [bool(ok), detail]
        print(f"{time.perf_counter() - start:6.2f} s  {name}: {ok}", file=sys.stderr, flush=True)

    {"single": single, "first": first, "resume": resume}[args.phase](args.out, record)
    name = f"{args.phase}-{jax.process_index()}.json"
    (args.out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        main()
    except BaseException:
        # Exit now: a normal exit would first wait (shutdown_timeout_seconds) at
        # jax.distributed's shutdown barrier for a partner that may be stuck in a collective.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
