"""Every rmsjax optimizer, side by side, on three classic test surfaces.

The surfaces (minimum value 0 for each):

* bowl        f(x, y) = x^2 + y^2                   over [-1, 1]^2, from (0.54, 0.34)
* valley      f(x, y) = x^2 + 10 y^2                (elongated: curvatures 2 and 20)
* rosenbrock  f(x, y) = (1 - x)^2 + 100 (y - x^2)^2  (curved, flat-bottomed valley)

For each surface and optimizer it prints a textbook iteration table ``iteration | (x, y) | f``
and, unless ``--no-plot``, saves one contour plot per surface with every trajectory drawn
over the filled contours, plus ``loss.png`` (f against the step, log scale). Plots need
matplotlib (``pip install -e ".[examples]"``); they are drawn headless (Agg backend).

Run:  python examples/trajectories.py [--steps 500] [--out trajectories] [--no-plot]
The README's pictures are ``--out docs/img`` with the default number of steps.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import rmsjax


@dataclass(frozen=True)
class Surface:
    name: str
    title: str
    f: Callable[[jax.Array], jax.Array]
    start: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    minimum: tuple[float, float]
    log_levels: bool


SURFACES = (
    Surface(
        "bowl",
        "bowl  f = x² + y²",
        lambda p: p[0] ** 2 + p[1] ** 2,
        (0.54, 0.34),
        (-1.0, 1.0),
        (-1.0, 1.0),
        (0.0, 0.0),
        False,
    ),
    Surface(
        "valley",
        "elongated valley  f = x² + 10 y²",
        lambda p: p[0] ** 2 + 10.0 * p[1] ** 2,
        (-0.9, 0.45),
        (-1.0, 1.0),
        (-0.6, 0.6),
        (0.0, 0.0),
        False,
    ),
    Surface(
        "rosenbrock",
        "Rosenbrock  f = (1 - x)² + 100 (y - x²)²",
        lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2,
        (-1.2, 1.0),
        (-2.0, 2.0),
        (-1.0, 3.0),
        (1.0, 1.0),
        True,
    ),
)

# name -> (label, factory of the learning rate, learning rate per surface). The rates are
# hand-picked so that each method shows its typical behaviour within a few hundred steps;
# they are not tuned to make any method win.
OPTIMIZERS: dict[str, tuple[str, Callable[[Any], Any], dict[str, Any]]] = {
    "sgd": ("SGD", lambda lr: rmsjax.sgd(lr), {"bowl": 0.05, "valley": 0.09, "rosenbrock": 2e-3}),
    "momentum": (
        "SGD + momentum 0.9",
        lambda lr: rmsjax.sgd(lr, momentum=0.9),
        {"bowl": 0.01, "valley": 0.01, "rosenbrock": 1e-3},
    ),
    "nesterov": (
        "SGD + Nesterov 0.9",
        lambda lr: rmsjax.sgd(lr, momentum=0.9, nesterov=True),
        {"bowl": 0.01, "valley": 0.01, "rosenbrock": 1e-3},
    ),
    "adagrad": (
        "AdaGrad",
        lambda lr: rmsjax.adagrad(lr),
        {"bowl": 0.1, "valley": 0.1, "rosenbrock": 0.5},
    ),
    "adadelta": (
        "AdaDelta (no lr: rate 1)",
        lambda lr: rmsjax.adadelta(lr),
        {"bowl": None, "valley": None, "rosenbrock": None},
    ),
    "rmsprop": (
        "RMSProp (decay 0.99)",
        lambda lr: rmsjax.rmsprop(lr, decay=0.99),
        {"bowl": 0.01, "valley": 0.01, "rosenbrock": 0.01},
    ),
    "rmsprop_centered": (
        "RMSProp centered",
        lambda lr: rmsjax.rmsprop(lr, decay=0.99, centered=True),
        {"bowl": 0.01, "valley": 0.01, "rosenbrock": 0.01},
    ),
    "rmsprop_momentum": (
        "RMSProp + momentum 0.9",
        lambda lr: rmsjax.rmsprop(lr, decay=0.99, momentum=0.9),
        {"bowl": 0.002, "valley": 0.002, "rosenbrock": 0.002},
    ),
    "adam": (
        "Adam",
        lambda lr: rmsjax.adam(lr),
        {"bowl": 0.05, "valley": 0.05, "rosenbrock": 0.1},
    ),
    "adamw": (
        "AdamW (wd 1e-2)",
        lambda lr: rmsjax.adamw(lr, weight_decay=1e-2),
        {"bowl": 0.05, "valley": 0.05, "rosenbrock": 0.1},
    ),
    "rprop": (
        "Rprop",
        lambda lr: rmsjax.rprop(lr),
        {"bowl": 0.05, "valley": 0.05, "rosenbrock": 0.01},
    ),
}


# one colour per optimizer, the same in every picture (tab10 and black)
COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000",
)  # fmt: skip


def run_surface(surface: Surface, steps: int) -> dict[str, np.ndarray]:
    """Positions (steps + 1, 2) of every optimizer on ``surface``, all in one jitted scan."""
    names = list(OPTIMIZERS)
    opts = [OPTIMIZERS[n][1](OPTIMIZERS[n][2][surface.name]) for n in names]
    grad = jax.grad(surface.f)

    def step(carry: list[Any], _: Any) -> tuple[list[Any], jax.Array]:
        new = []
        for opt, (p, state) in zip(opts, carry, strict=True):
            updates, state = opt.update(grad(p), state, p)
            new.append((rmsjax.apply_updates(p, updates), state))
        return new, jnp.stack([p for p, _ in new])

    @jax.jit
    def run(p0: jax.Array) -> jax.Array:
        _, path = jax.lax.scan(step, [(p0, o.init(p0)) for o in opts], None, length=steps)
        return jnp.concatenate([jnp.broadcast_to(p0, (1, len(opts), 2)), path])

    path = np.asarray(run(jnp.asarray(surface.start, jnp.float32)))
    return {n: path[:, i] for i, n in enumerate(names)}


def table_rows(steps: int) -> list[int]:
    """Iterations shown in the tables: the first five, then about ten more, and the last."""
    every = max(steps // 10, 1)
    return sorted({*range(min(steps, 5) + 1), *range(0, steps + 1, every), steps})


def print_table(surface: Surface, name: str, path: np.ndarray, values: np.ndarray) -> None:
    print(f"\n{surface.name} / {OPTIMIZERS[name][0]}")
    print(" iteration | (x, y)                 | f")
    print("-----------+------------------------+-----------")
    for i in table_rows(len(path) - 1):
        x, y = path[i]
        print(f" {i:9d} | ({x:+.6f}, {y:+.6f}) | {values[i]:.3e}")


def plot_surface(
    surface: Surface, paths: dict[str, np.ndarray], values: dict[str, np.ndarray], out: Path
) -> Path:
    """One panel per optimizer (its path over the filled contours), and one with all paths."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    grid_x, grid_y = np.meshgrid(np.linspace(*surface.xlim, 160), np.linspace(*surface.ylim, 160))
    f_grid = jax.jit(jax.vmap(jax.vmap(surface.f, in_axes=1), in_axes=1))
    z = np.asarray(f_grid(jnp.stack([jnp.asarray(grid_x), jnp.asarray(grid_y)])))
    if surface.log_levels:
        contour_kw = dict(levels=np.logspace(-2, np.log10(z.max() + 1e-2), 16), norm=LogNorm())
        z = z + 1e-2
    else:
        contour_kw = dict(levels=16)
    names = list(paths)
    cols = 4
    rows = -(-(len(names) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.9 * rows), dpi=72)
    for k, ax in enumerate(axes.flat):
        if k > len(names):
            ax.axis("off")
            continue
        ax.contourf(grid_x, grid_y, z, cmap="Blues", **contour_kw)
        shown = names if k == len(names) else [names[k]]
        for name in shown:
            path = paths[name]
            color = COLORS[names.index(name) % len(COLORS)]
            ax.plot(path[:, 0], path[:, 1], "-", color=color, lw=1.2, marker=".", ms=2)
        ax.plot(*surface.start, "ko", ms=4)
        ax.plot(*surface.minimum, "*", color="gold", mec="k", ms=10)
        ax.set(xlim=surface.xlim, ylim=surface.ylim, xticks=[], yticks=[])
        if k == len(names):
            ax.set_title("all of them", fontsize=9)
        else:
            final = values[names[k]][-1]
            ax.set_title(f"{OPTIMIZERS[names[k]][0]}\nf = {final:.1e}", fontsize=9)
    steps = len(paths[names[0]]) - 1
    fig.suptitle(f"{surface.title}, {steps} steps from {surface.start} (star: minimum)")
    fig.tight_layout()
    target = out / f"{surface.name}.png"
    fig.savefig(target)
    plt.close(fig)
    return target


def plot_losses(values: dict[str, dict[str, np.ndarray]], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(13.0, 4.2), dpi=80, sharey=False)
    for ax, (surface_name, per_opt) in zip(axes, values.items(), strict=True):
        for k, (name, f) in enumerate(per_opt.items()):
            ax.semilogy(
                np.maximum(f, 1e-16),
                color=COLORS[k % len(COLORS)],
                lw=1.3,
                label=OPTIMIZERS[name][0],
            )
        ax.set(title=surface_name, xlabel="step", ylabel="f (floored at 1e-16)")
        ax.grid(True, which="major", alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    target = out / "loss.png"
    fig.savefig(target, bbox_inches="tight")
    plt.close(fig)
    return target


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run everything; return ``{"paths": {surface: {opt: (steps+1, 2)}}, "f": ..., "pngs":
    [...]}`` for tests and notebooks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    parser.add_argument("--out", type=Path, default=Path("trajectories"), help="PNG folder")
    parser.add_argument("--no-plot", action="store_true", help="print the tables only")
    parser.add_argument("--quiet", action="store_true", help="no tables, only the summary")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    started = time.perf_counter()
    paths: dict[str, dict[str, np.ndarray]] = {}
    values: dict[str, dict[str, np.ndarray]] = {}
    for surface in SURFACES:
        paths[surface.name] = run_surface(surface, args.steps)
        f = jax.jit(jax.vmap(surface.f))
        values[surface.name] = {n: np.asarray(f(p)) for n, p in paths[surface.name].items()}
        if not args.quiet:
            for name, path in paths[surface.name].items():
                print_table(surface, name, path, values[surface.name][name])

    print(f"\nfinal f after {args.steps} steps")
    print(f"{'optimizer':28s}" + "".join(f"{s.name:>13s}" for s in SURFACES))
    for name in OPTIMIZERS:
        row = "".join(f"{values[s.name][name][-1]:13.3e}" for s in SURFACES)
        print(f"{OPTIMIZERS[name][0]:28s}{row}")

    pngs: list[Path] = []
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        args.out.mkdir(parents=True, exist_ok=True)
        for surface in SURFACES:
            pngs.append(plot_surface(surface, paths[surface.name], values[surface.name], args.out))
        pngs.append(plot_losses(values, args.out))
        print("\nwrote " + ", ".join(str(p) for p in pngs))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return {"paths": paths, "f": values, "pngs": pngs}


if __name__ == "__main__":
    main()
