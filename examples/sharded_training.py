"""FSDP-style training with rmsjax: weights, gradients and optimizer state sharded over a mesh.

Every weight matrix is split over the ``fsdp`` axis of a ``jax.make_mesh`` mesh, gathered
only for the forward pass, and the batch is split over the same axis (ZeRO-3 / FSDP). The
optimizer state is created sharded like the parameters, so its memory per device falls as
devices are added: rmsjax needs no code of its own for this.

Run on 8 simulated CPU devices (any number of GPUs/TPUs works the same way):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_training.py

Checkpoint and resume with Orbax (the second command continues the first exactly):

    XLA_FLAGS=... python examples/sharded_training.py --steps 50 --checkpoint /tmp/ckpt
    XLA_FLAGS=... python examples/sharded_training.py --steps 100 --checkpoint /tmp/ckpt --resume

``--compare`` also runs the same training on one device and prints the largest difference.

Several processes (several hosts, or two processes on one machine as here) run the same command
with their own ``--process-id``; the mesh then spans the devices of all of them, and each process
feeds only its own rows of every batch:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/sharded_training.py \
        --coordinator 127.0.0.1:8476 --num-processes 2 --process-id 0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/sharded_training.py \
        --coordinator 127.0.0.1:8476 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsjax

IN, HIDDEN, CLASSES = 32, 256, 8
BATCH, DATASET = 256, 4096
AXIS = "fsdp"

# Which dimension of each parameter is split over the devices. b2 stays replicated, to show that
# a replicated parameter keeps replicated state.
SPECS = {"w1": P(None, AXIS), "b1": P(AXIS), "w2": P(AXIS, None), "b2": P()}


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded mixture of CLASSES Gaussian blobs in IN dimensions (host arrays)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, IN)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=DATASET).astype(np.int32)
    x = centres[y] + 1.5 * rng.normal(size=(DATASET, IN)).astype(np.float32)
    return x, y


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialised weights of a two-layer MLP, on the host (placed by the caller)."""
    rng = np.random.default_rng(seed + 1)
    return {
        "w1": (rng.normal(size=(IN, HIDDEN)) * np.sqrt(2 / IN)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.normal(size=(HIDDEN, CLASSES)) * np.sqrt(2 / HIDDEN)).astype(np.float32),
        "b2": np.zeros(CLASSES, np.float32),
    }


def make_optimizer(momentum: float | None = None) -> optax.GradientTransformation:
    """Centered RMSProp with a decaying learning rate: its position in the schedule is state."""
    lr = optax.exponential_decay(3e-3, transition_steps=20, decay_rate=0.7)
    return rmsjax.rmsprop(lr, decay=0.95, centered=True, momentum=momentum)


def connect(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the other processes (``jax.distributed``); call it before anything touches a device.

    ``coordinator`` is ``HOST:PORT`` of process 0, the same in every process. A loopback
    coordinator (``127.0.0.1``, ``localhost``: all processes on one machine) listens on the
    loopback interface only; any other listens on all of process 0's interfaces. Between
    processes, CPU devices exchange data through gloo (GPUs and TPUs use their own transport).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    loopback = coordinator.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        coordinator_bind_address=coordinator if loopback else None,
    )


def make_mesh(axis_type: str = "explicit") -> jax.sharding.Mesh:
    """A 1-D mesh over all devices; ``axis_type`` is "explicit" or "auto"."""
    kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_type]
    return jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(kind,))


def loss_fn(params: Any, x: jax.Array, y: jax.Array, gather: Callable[[Any], Any]) -> jax.Array:
    """Mean cross-entropy of the MLP; ``gather`` all-gathers the sharded weights (FSDP)."""
    p = jax.tree.map(gather, params)
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


class Run:
    """Parameters, optimizer state and a jitted step, on a mesh (FSDP) or on one device."""

    def __init__(
        self,
        mesh: jax.sharding.Mesh | None,
        momentum: float | None = None,
        *,
        shard_batch: bool = True,
    ) -> None:
        self.mesh = mesh
        self.shard_batch = shard_batch
        self.opt = make_optimizer(momentum)
        self.x, self.y = make_data()
        self.step_count = 0
        host = init_params()
        if mesh is None:
            self.params = jax.tree.map(jnp.asarray, host)
            self.opt_state = jax.jit(self.opt.init)(self.params)
            gather = lambda a: a
            out_shardings = None
        else:
            self.params = {k: jax.device_put(v, self.sharding(SPECS[k])) for k, v in host.items()}
            # In Auto mode a jitted init would replicate the state; state_sharding pins every
            # leaf to its parameter's sharding (and `count` to a replicated one).
            self.state_shardings = rmsjax.state_sharding(self.opt, self.params)
            with jax.set_mesh(mesh):
                self.opt_state = jax.jit(self.opt.init, out_shardings=self.state_shardings)(
                    self.params
                )
            gather = lambda a: jax.sharding.reshard(a, P())
            param_shardings = jax.tree.map(lambda a: a.sharding, self.params)
            out_shardings = (param_shardings, self.state_shardings, self.sharding(P()))
        opt = self.opt

        # Donating params and state lets XLA update them in place: without it every step holds
        # two copies of the (sharded) state.
        @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out_shardings)
        def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y, gather)
            updates, opt_state = opt.update(grads, opt_state, params)
            return rmsjax.apply_updates(params, updates), opt_state, loss

        self._step = step

    def sharding(self, spec: P) -> NamedSharding:
        assert self.mesh is not None
        return NamedSharding(self.mesh, spec)

    def host_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch number ``step`` (a pure function of the step, so a resumed run sees the same)."""
        start = (step * BATCH) % DATASET
        return self.x[start : start + BATCH], self.y[start : start + BATCH]

    def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
        """Batch ``step`` on the devices: split over the mesh, each process giving its rows."""
        x, y = self.host_batch(step)
        if self.mesh is None:
            return jnp.asarray(x), jnp.asarray(y)
        axis = AXIS if self.shard_batch else None
        return (
            from_process_rows(x, self.sharding(P(axis, None))),
            from_process_rows(y, self.sharding(P(axis))),
        )

    def train(self, steps: int) -> list[float]:
        """Run ``steps`` more steps; return their losses."""
        losses = []
        for _ in range(steps):
            x, y = self.batch(self.step_count)
            if self.mesh is None:
                self.params, self.opt_state, loss = self._step(self.params, self.opt_state, x, y)
            else:
                with jax.set_mesh(self.mesh):
                    self.params, self.opt_state, loss = self._step(
                        self.params, self.opt_state, x, y
                    )
            self.step_count += 1
            losses.append(float(loss))
        return losses

    # ---------------------------------------------------------------- checkpointing (Orbax)

    def save(self, directory: str) -> None:
        """Save params and optimizer state as checkpoint number ``step_count`` in ``directory``."""
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
            item = {"params": self.params, "opt_state": self.opt_state}
            manager.save(self.step_count, args=ocp.args.StandardSave(item))
            manager.wait_until_finished()

    def restore(self, directory: str) -> None:
        """Load the latest checkpoint in ``directory`` into this run, sharded like this run.

        The freshly initialised params and state are the template: Orbax restores each array
        with the template's shape, dtype and sharding. A checkpoint written by an optimizer with
        another state structure (momentum added or removed, centered or not, another optimizer)
        raises ``ValueError``; it is never loaded partially.
        """
        import orbax.checkpoint as ocp

        template = {"params": self.params, "opt_state": self.opt_state}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint found in {directory!r}.")
            try:
                restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except ValueError as err:
                raise ValueError(
                    f"Checkpoint {step} in {directory!r} does not fit this run: its tree "
                    "structure or array shapes differ from this model's and optimizer's. Build "
                    "them with the settings the checkpoint was saved with (model sizes, "
                    f"momentum, centered, ...).\nOrbax says: {err}"
                ) from err
        self.params, self.opt_state = restored["params"], restored["opt_state"]
        self.step_count = step


def from_process_rows(whole: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array ``whole``, built from the rows this process's devices hold.

    With several processes each one passes only its part (a data loader on each host reads only
    that part); with one process that part is all of ``whole``.
    """
    spans = [
        index[0].indices(len(whole))[:2]
        for index in sharding.addressable_devices_indices_map(whole.shape).values()
    ]
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    return jax.make_array_from_process_local_data(sharding, whole[start:stop], whole.shape)


def host_values(tree: Any) -> Any:
    """``tree`` with every leaf's full value as a NumPy array, in every process (a collective
    when the arrays span several processes: every process must call it)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def state_bytes(opt_state: Any) -> tuple[int, int]:
    """(total bytes of the state, bytes of it held on this process's first device)."""
    leaves = jax.tree.leaves(opt_state)
    total = sum(leaf.nbytes for leaf in leaves)
    device = jax.local_devices()[0]
    on_device = sum(
        shard.data.nbytes
        for leaf in leaves
        for shard in leaf.addressable_shards
        if shard.device == device
    )
    return total, on_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="train until this step")
    parser.add_argument("--axis-type", choices=["explicit", "auto"], default="explicit")
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--checkpoint", default=None, help="directory to save the run to")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--compare", action="store_true", help="also train on one device")
    group = parser.add_argument_group("several processes (all three, the same in each but the id)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    args = parser.parse_args()
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(a is not None for a in distributed):
        if any(a is None for a in distributed):
            parser.error("--coordinator, --num-processes and --process-id go together")
        connect(args.coordinator, args.num_processes, args.process_id)
    # Every process runs all of the code below (the collectives need them all); one reports.
    say = print if jax.process_index() == 0 else lambda *_: None

    mesh = make_mesh(args.axis_type)
    say(
        f"{jax.device_count()} devices in {jax.process_count()} process(es), "
        f"mesh {dict(mesh.shape)} ({args.axis_type} axes)"
    )
    if jax.device_count() == 1:
        say("(one device only: set XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    run = Run(mesh, args.momentum)
    if args.resume:
        run.restore(args.checkpoint)
        say(f"resumed from step {run.step_count} in {args.checkpoint}")
    total, on_device = state_bytes(run.opt_state)
    say(f"optimizer state: {total} bytes in all, {on_device} bytes on one device")
    losses = run.train(max(args.steps - run.step_count, 0))
    first = run.step_count - len(losses)
    for i, loss in enumerate(losses):
        if (first + i) % 10 == 0 or i == len(losses) - 1:
            say(f"step {first + i + 1:4d}  loss {loss:.4f}")
    if args.checkpoint:
        run.save(args.checkpoint)
        say(f"saved step {run.step_count} to {args.checkpoint}")
    if args.compare:
        params = host_values(run.params)
        single = Run(None, args.momentum)
        single.train(run.step_count)
        diff = max(
            float(np.max(np.abs(a - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single.params), strict=True)
        )
        say(f"largest parameter difference, {jax.device_count()} devices vs 1: {diff:.2e}")


if __name__ == "__main__":
    main()
