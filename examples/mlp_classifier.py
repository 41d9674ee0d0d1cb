"""A Flax NNX MLP learns three interleaved spirals, with four optimizers side by side.

The data are generated here (nothing is downloaded): three spiral arms in the plane, with a
held-out test set drawn from the same distribution. Each optimizer trains the same network
from the same initial weights on the same mini-batches; the script prints held-out accuracy
and writes a PNG of the training-loss curves.

    python examples/mlp_classifier.py                       # all four, writes mlp_classifier.png
    python examples/mlp_classifier.py --optimizer rmsprop --steps 500 --out rms.png
    python examples/mlp_classifier.py --checkpoint /tmp/mlp  # also save model + optimizer state
    python examples/mlp_classifier.py --unfused  # flax's nnx.Optimizer: update + apply_updates

The training step is the standard NNX one. By default the optimizer is
``rmsjax.fused.nnx.Optimizer(model, rmsjax.fused.rmsprop(...), wrt=nnx.Param)``: an
``nnx.Optimizer`` whose ``update`` runs the fused step (the native CPU kernel: update and apply
in one pass over memory). ``--unfused`` uses flax's own ``nnx.Optimizer(model,
rmsjax.rmsprop(...), wrt=nnx.Param)`` instead; both give the same numbers to float32 rounding,
and the same optimizer state (a checkpoint of one restores into the other).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rmsjax

CLASSES = 3
BATCH = 128
TURNS = 1.75  # turns of each spiral arm
NOISE = 0.3  # angular noise (radians): the arms overlap a little, so 100% is out of reach
SIZES = [2, 64, 64, CLASSES]  # layer widths: input, two hidden layers, class logits


# name -> (label for the plot, factory). The learning rates are common starting values for each
# optimizer (the centered one carries momentum 0.9, hence a 10x smaller rate); they were checked
# to train on this problem, not tuned: the picture is an illustration, not a benchmark. A
# factory takes ``rmsjax`` (the optax-protocol optimizers) or ``rmsjax.fused`` (the same
# optimizers with a fused step; they also take ``min_native_size``, see FUSED_OPTIONS).
OPTIMIZERS: dict[str, tuple[str, Callable[..., Any]]] = {
    "rmsprop": ("rmsprop (lr 1e-2)", lambda m, **kw: m.rmsprop(1e-2, **kw)),
    "centered": (
        "centered rmsprop + momentum 0.9 (lr 1e-3)",
        lambda m, **kw: m.rmsprop(1e-3, centered=True, momentum=0.9, **kw),
    ),
    "adamw": ("adamw (lr 1e-2)", lambda m, **kw: m.adamw(1e-2, weight_decay=1e-4, **kw)),
    "sgd": ("sgd + momentum 0.9 (lr 0.2)", lambda m, **kw: m.sgd(0.2, momentum=0.9, **kw)),
}
# This MLP's largest kernel has 64 x 64 = 4096 elements, below rmsjax.fused.MIN_NATIVE_SIZE
# (16384): by default every leaf would take the compiled pure-JAX rule, which is faster on
# arrays this small. min_native_size=0 sends them all to the native kernel anyway, so that the
# example runs it; keep the default for real models.
FUSED_OPTIONS = {"min_native_size": 0}


def make_spirals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points on CLASSES interleaved spiral arms with Gaussian noise: (x, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=n)
    radius = rng.uniform(0.05, 1.0, size=n)
    angle = TURNS * 2 * np.pi * radius + 2 * np.pi * labels / CLASSES
    angle = angle + rng.normal(scale=NOISE, size=n)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return x.astype(np.float32), labels.astype(np.int32)


class MLP(nnx.Module):
    """Linear -> ReLU -> ... -> Linear."""

    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def build(name: str, seed: int = 0, *, fused: bool = True) -> tuple[MLP, nnx.Optimizer]:
    """The network (same weights for every optimizer) and its optimizer: with ``fused``,
    ``rmsjax.fused.nnx.Optimizer`` over ``rmsjax.fused.<name>``, else flax's
    ``nnx.Optimizer`` over the optax-protocol ``rmsjax.<name>``."""
    model = MLP(SIZES, rngs=nnx.Rngs(seed))
    factory = OPTIMIZERS[name][1]
    if fused:
        tx = factory(rmsjax.fused, **FUSED_OPTIONS)
        return model, rmsjax.fused.nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, nnx.Optimizer(model, factory(rmsjax), wrt=nnx.Param)


def train(
    name: str, steps: int, seed: int = 0, *, progress: bool = True, fused: bool = True
) -> tuple[list[float], float, MLP, nnx.Optimizer]:
    """Train with optimizer ``name``: (losses per step, held-out accuracy, model, optimizer)."""
    from tqdm import tqdm

    x_train, y_train = make_spirals(4096, seed)
    x_test, y_test = make_spirals(2048, seed + 1)
    model, optimizer = build(name, seed, fused=fused)
    batches = np.random.default_rng(seed + 2)
    losses = []
    # cached_partial keeps the NNX graph traversal out of the per-step Python overhead.
    step = nnx.cached_partial(train_step, model, optimizer)
    bar = tqdm(range(steps), desc=f"{name:9s}", disable=not progress, leave=True)
    for _ in bar:
        idx = batches.integers(0, len(x_train), size=BATCH)
        losses.append(float(step(x_train[idx], y_train[idx])))
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    acc = float(accuracy(model, x_test, y_test))
    return losses, acc, model, optimizer


def save_checkpoint(directory: str, model: MLP, optimizer: nnx.Optimizer) -> None:
    """Save the model's and the optimizer's NNX state with Orbax (step = optimizer.step)."""
    import orbax.checkpoint as ocp

    item = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        manager.save(int(optimizer.step.get_value()), args=ocp.args.StandardSave(item))
        manager.wait_until_finished()


def restore_checkpoint(directory: str, model: MLP, optimizer: nnx.Optimizer) -> None:
    """Load the latest checkpoint into a freshly built ``model`` and ``optimizer`` in place.

    The fresh objects are the template (shapes, dtypes, tree structure); a checkpoint from an
    optimizer with another state structure raises ``ValueError`` from Orbax.
    """
    import orbax.checkpoint as ocp

    template = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])


def smooth(values: list[float], width: int = 20) -> np.ndarray:
    """Trailing moving average (the curves of single mini-batches are noisy)."""
    v = np.asarray(values)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i + 1 - width)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot(curves: dict[str, tuple[list[float], float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for name, (losses, acc) in curves.items():
        ax.plot(smooth(losses), label=f"{OPTIMIZERS[name][0]}: test acc {acc:.1%}", lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average of 20)")
    ax.set_title("Flax NNX MLP on three spirals")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example (``argv``: command-line arguments).

    Returns ``{name: (losses, held-out accuracy, model, optimizer)}``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--optimizer", choices=["all", *OPTIMIZERS], default="all")
    parser.add_argument("--out", default="mlp_classifier.png", help="PNG of the loss curves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="save model+optimizer state here")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="flax's nnx.Optimizer (update + apply_updates) instead of the fused step",
    )
    args = parser.parse_args(argv)
    fused = not args.unfused

    names = list(OPTIMIZERS) if args.optimizer == "all" else [args.optimizer]
    runs = {}
    start = time.perf_counter()
    for name in names:
        losses, acc, model, optimizer = train(name, args.steps, args.seed, fused=fused)
        runs[name] = (losses, acc, model, optimizer)
        print(f"{name:9s} final loss {np.mean(losses[-50:]):.4f}  held-out accuracy {acc:.1%}")
        if args.checkpoint:
            directory = os.path.join(args.checkpoint, name)
            save_checkpoint(directory, model, optimizer)
            fresh_model, fresh_optimizer = build(name, args.seed + 1, fused=fused)
            restore_checkpoint(directory, fresh_model, fresh_optimizer)
            same = all(
                bool(jnp.array_equal(a, b))
                for a, b in zip(
                    jax.tree.leaves(nnx.state(optimizer)),
                    jax.tree.leaves(nnx.state(fresh_optimizer)),
                    strict=True,
                )
            )
            print(f"          saved to {directory}; restored state identical: {same}")
    print(f"trained in {time.perf_counter() - start:.1f} s")
    plot({name: run[:2] for name, run in runs.items()}, args.out)
    print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
