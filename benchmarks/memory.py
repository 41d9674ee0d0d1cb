"""Optimizer-state memory and step time by moment storage (float32, bfloat16, 8-bit, 4-bit).

Memory: the exact bytes of ``opt.init(params)`` (every array leaf: moments, codes, scales,
PRNG keys, counts), computed with ``jax.eval_shape`` (nothing is allocated), per parameter, for
RMSProp, centered RMSProp and AdamW on a transformer-like tree of matrices and biases; and the
peak of the compiled pure-JAX step on that tree (XLA's memory analysis: nothing runs).

Step time: ``jax.jit(step, donate_argnums=(0, 2))`` with ``step = update + apply_updates`` of
the pure-JAX (optax-protocol) optimizer, float32 state against each storage, in one process,
implementations interleaved (their order rotates every repetition), median over repetitions;
the ratio to float32 is the median of the per-repetition ratios.

Usage::

  python benchmarks/memory.py           # memory table + step times on 4M parameters
  python benchmarks/memory.py --quick   # fewer repetitions

Writes ``<out>/memory.json`` and ``<out>/memory.md`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import describe, peak_bytes

import rmsjax

STORAGES: dict[str, Any] = {
    "float32": None,
    "bfloat16": jnp.bfloat16,
    "bfloat16 + stochastic rounding": rmsjax.stochastic_rounding(jnp.bfloat16),
    "8-bit": rmsjax.quantized(8),
    "4-bit": rmsjax.quantized(4),
    # first moments in 4 bits, the second moment factored (rows and columns, Adafactor)
    "4-bit + factored nu": {"first": rmsjax.quantized(4), "second": rmsjax.factored()},
}


def optimizers(storage: Any) -> dict[str, Any]:
    first, second = (
        (storage["first"], storage["second"]) if isinstance(storage, dict) else (storage, storage)
    )
    return {
        "rmsprop": rmsjax.rmsprop(1e-3, nu_dtype=second),
        "rmsprop centered": rmsjax.rmsprop(1e-3, centered=True, nu_dtype=second, mu_dtype=first),
        "adamw": rmsjax.adamw(1e-3, mu_dtype=first, nu_dtype=second),
    }


def model_shapes(width: int, layers: int) -> dict[str, Any]:
    """A transformer-like tree: per layer four (w, w) and two (w, 4w)/(4w, w) matrices, biases
    and norms (below the 4096-entry minimum only when small)."""
    tree: dict[str, Any] = {}
    for i in range(layers):
        tree[f"layer{i}"] = {
            "attn": {n: (width, width) for n in ("q", "k", "v", "o")},
            "mlp_in": (width, 4 * width),
            "mlp_out": (4 * width, width),
            "mlp_bias": (4 * width,),
            "norm": (width,),
        }
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def state_bytes(opt: Any, params: Any) -> int:
    state = jax.eval_shape(opt.init, params)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def step_peak_bytes(opt: Any, params: Any) -> int:
    """The peak of the compiled pure-JAX step ``update + apply_updates`` (parameters and state
    donated): arguments + outputs - aliased + temporaries, from XLA's memory analysis."""
    state = jax.eval_shape(opt.init, params)

    def step(p: Any, g: Any, s: Any) -> tuple[Any, Any]:
        u, s = opt.update(g, s, p)
        return rmsjax.apply_updates(p, u), s

    return peak_bytes(jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state).compile())


def memory_table(params: Any) -> list[dict[str, Any]]:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    rows = []
    for storage_name, storage in STORAGES.items():
        for opt_name, opt in optimizers(storage).items():
            total = state_bytes(opt, params)
            peak = step_peak_bytes(opt, params)
            rows.append(
                {
                    "optimizer": opt_name,
                    "storage": storage_name,
                    "params": n,
                    "state_bytes": total,
                    "bytes_per_param": total / n,
                    # at the step: parameters and gradients (float32) + state + temporaries
                    "resident_bytes_per_param": (8 * n + total) / n,
                    "step_peak_bytes_per_param": peak / n,
                }
            )
    return rows


def timed_steps(reps: int, inner: int, size: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    shape = (size // 1024, 1024)
    results = []
    for opt_name in ("rmsprop centered", "adamw"):
        steps: dict[str, Callable[[], None]] = {}
        for storage_name, storage in STORAGES.items():
            opt = optimizers(storage)[opt_name]

            def step(p: Any, g: Any, s: Any, opt: Any = opt) -> tuple[Any, Any]:
                u, s = opt.update(g, s, p)
                return rmsjax.apply_updates(p, u), s

            fn = jax.jit(step, donate_argnums=(0, 2))
            params = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}
            grads = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}
            carry = [params, opt.init(params)]
            carry[:] = fn(carry[0], grads, carry[1])  # compile
            jax.block_until_ready(carry)

            def run(fn: Any = fn, grads: Any = grads, carry: list[Any] = carry) -> None:
                for _ in range(inner):
                    carry[:] = fn(carry[0], grads, carry[1])
                jax.block_until_ready(carry)

            steps[storage_name] = run
        times: dict[str, list[float]] = {k: [] for k in steps}
        names = list(steps)
        for r in range(reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                start = time.perf_counter()
                steps[name]()
                times[name].append((time.perf_counter() - start) / inner)
        for name in names:
            ratios = [a / b for a, b in zip(times[name], times["float32"], strict=True)]
            results.append(
                {
                    "optimizer": opt_name,
                    "storage": name,
                    "params": size,
                    "median_ms": 1e3 * statistics.median(times[name]),
                    "ratio_to_float32": statistics.median(ratios),
                }
            )
    return results


def _storage_table(
    memory: list[dict[str, Any]], cell: Callable[[dict[str, Any]], str]
) -> list[str]:
    """A markdown table of ``cell(row)``, one line per optimizer, one column per storage."""
    lines = ["| optimizer | " + " | ".join(STORAGES) + " |", "|---|" + "---:|" * len(STORAGES)]
    for opt_name in ("rmsprop", "rmsprop centered", "adamw"):
        cells = [
            cell(r)
            for s in STORAGES
            for r in memory
            if r["optimizer"] == opt_name and r["storage"] == s
        ]
        lines.append(f"| {opt_name} | " + " | ".join(cells) + " |")
    return lines


def markdown(memory: list[dict[str, Any]], timing: list[dict[str, Any]], info: str) -> str:
    lines = [
        "# Optimizer-state memory and step time by moment storage",
        "",
        f"Produced by `python benchmarks/memory.py` ({info}).",
        "",
        f"## State bytes per parameter ({memory[0]['params']:,} parameters, exact)",
        "",
        *_storage_table(memory, lambda r: f"{r['bytes_per_param']:.4f}"),
        "",
        "## The step's peak, pure-JAX path (bytes per parameter)",
        "",
        "XLA's memory analysis of the compiled `update + apply_updates` with parameters and state",
        "donated (arguments + outputs - aliased + temporaries), beside the resident data",
        "(float32 parameters and gradients, and the state): peak / resident.",
        "",
        *_storage_table(
            memory,
            lambda r: f"{r['step_peak_bytes_per_param']:.2f} / {r['resident_bytes_per_param']:.2f}",
        ),
    ]
    lines += [
        "",
        f"## Step time, pure-JAX path ({timing[0]['params']:,} float32 parameters, one leaf)",
        "",
        "| optimizer | storage | median step (ms) | ratio to float32 state |",
        "|---|---|---:|---:|",
    ]
    for r in timing:
        lines.append(
            f"| {r['optimizer']} | {r['storage']} | {r['median_ms']:.2f} | "
            f"{r['ratio_to_float32']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="recompute the memory table only; keep the step times of the existing memory.json",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    params = model_shapes(width=1024, layers=4)
    memory = memory_table(params)
    out = Path(args.out)
    if args.memory_only:
        old = json.loads((out / "memory.json").read_text())
        timing = old["timing"]
        info = old["info"].split("; memory table")[0] + "; memory table recomputed by --memory-only"
    else:
        reps, inner = (5, 3) if args.quick else (11, 5)
        timing = timed_steps(reps, inner, size=4 * 1024 * 1024)
        info = f"jax {jax.__version__}, {describe()}, {reps} repetitions of {inner} steps"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(
        json.dumps({"info": info, "memory": memory, "timing": timing}, indent=1)
    )
    (out / "memory.md").write_text(markdown(memory, timing, info))
    print(markdown(memory, timing, info))


if __name__ == "__main__":
    main()
