"""The native kernel's 8-bit AdamW step against optax's float32 AdamW step, on one leaf.

One float32 leaf of ``--size`` elements (default 32M, as rows of 4096), jitted and donated
steps: optax ``adamw(1e-3)`` update + apply_updates with float32 state, and
``rmsjax.fused.adamw(1e-3, mu_dtype=quantized(8), nu_dtype=quantized(8))``'s ``step`` (the
native kernel; ``--f32`` measures its float32-state step instead). The two are interleaved:
each repetition times ``--steps`` steps of each; the medians over ``--reps`` repetitions and
their ratio are printed with the kernel's status line (which instruction set its loops use;
``RMSJAX_NATIVE_ISA=avx2`` or ``=baseline`` forces a lower one).

Usage::

  python benchmarks/native_q8.py            # 8-bit state
  python benchmarks/native_q8.py --f32      # float32 state
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rmsjax
import rmsjax.native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--f32", action="store_true", help="float32 state in the fused step")
    args = parser.parse_args()
    print(rmsjax.native.status())
    shape = (args.size // 4096, 4096)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)}
    grads = {"w": jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32) * 1e-2}
    q8 = rmsjax.quantized(bits=8)
    storage: dict[str, Any] = {} if args.f32 else {"mu_dtype": q8, "nu_dtype": q8}
    fused = rmsjax.fused.adamw(1e-3, **storage)
    ref = optax.adamw(1e-3)

    def optax_step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        u, s = ref.update(g, s, p)
        return optax.apply_updates(p, u), s

    o_step = jax.jit(optax_step, donate_argnums=(0, 1))
    f_step = jax.jit(fused.step, donate_argnums=(0, 2))
    p_o = jax.tree.map(jnp.copy, params)
    s_o = ref.init(p_o)
    p_f = jax.tree.map(jnp.copy, params)
    s_f = fused.init(p_f)
    if "ffi_call" not in str(jax.make_jaxpr(fused.step)(p_f, grads, s_f)):
        print("note: the fused step does not run the native kernel here")
    t_o, t_f = [], []
    for rep in range(args.reps + 1):  # the first repetition compiles and warms up
        start = time.perf_counter()
        for _ in range(args.steps):
            p_o, s_o = o_step(p_o, s_o, grads)
        jax.block_until_ready(p_o)
        mid = time.perf_counter()
        for _ in range(args.steps):
            p_f, s_f = f_step(p_f, grads, s_f)
        jax.block_until_ready(p_f)
        end = time.perf_counter()
        if rep:
            t_o.append((mid - start) / args.steps)
            t_f.append((end - mid) / args.steps)
    m_o, m_f = statistics.median(t_o), statistics.median(t_f)
    kind = "float32" if args.f32 else "8-bit"
    print(
        f"optax float32 AdamW {m_o * 1e3:.1f} ms, fused {kind} AdamW {m_f * 1e3:.1f} ms: "
        f"{m_f / m_o:.2f}x (median of {args.reps} x {args.steps} steps)"
    )


if __name__ == "__main__":
    main()
