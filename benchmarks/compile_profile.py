"""Where the fused step's first call goes: CPU seconds of trace, lower, compile; fresh processes.

Builds the trees of ``benchmarks/run.py`` (``--leaves`` float32 leaves totalling ``--size`` M
parameters) and times, for each implementation (``floor``: the no-op step, ``fused``: the
rmsjax.fused step, ``optax``: update + apply_updates), the CPU seconds (``time.process_time``)
of ``jit(...).trace``, ``.lower``, ``.compile`` and the wall seconds of the first call
(compile + one step). Every measurement runs in its own Python process, so nothing is cached
by jax or XLA between them; ``--reps`` repetitions, medians reported.

Usage::

  python benchmarks/compile_profile.py                       # 1024 leaves, 32M, 3 configs
  python benchmarks/compile_profile.py --leaves 256,1024,2048 --configs adamw --impls fused
  python benchmarks/compile_profile.py --dump /tmp/hlo       # also write the optimized HLO
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _one(config: str, impl: str, leaves: int, size_m: int, dump: str | None) -> dict:
    """Runs in the child process: one measurement."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import jax
    import optax
    import run  # benchmarks/run.py: configs, trees, the floor step

    cfg = run.configs()[config]
    n = size_m * run.MiB  # as run.tree_shapes("<k> leaves", n), for any k
    shapes = {f"w{i:04d}": (n // leaves,) for i in range(leaves)}
    key = jax.random.key(0)
    params = run.make_tree(shapes, key, 1.0)
    grads = run.make_tree(shapes, jax.random.fold_in(key, 1), 1e-2)
    if impl == "floor":
        step, state = run.floor_step, cfg["optax"].init(params)
    elif impl == "optax":
        step = run.protocol_step(cfg["optax"], optax.apply_updates)
        state = cfg["optax"].init(params)
    else:
        step, state = cfg["fused"].step, cfg["fused"].init(params)
    jax.block_until_ready((params, grads, state))
    cpu, wall = time.process_time, time.perf_counter
    c0, t0 = cpu(), wall()
    traced = jax.jit(step, donate_argnums=(0, 2)).trace(params, grads, state)
    c1 = cpu()
    lowered = traced.lower()
    c2 = cpu()
    compiled = lowered.compile()
    c3 = cpu()
    out = compiled(params, grads, state)
    jax.block_until_ready(out)
    t1 = wall()
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        stem = f"{config}-{impl}-{leaves}"
        Path(dump, stem + ".stablehlo.txt").write_text(lowered.as_text())
        Path(dump, stem + ".hlo.txt").write_text(compiled.as_text())
    return dict(
        trace=c1 - c0,
        lower=c2 - c1,
        compile=c3 - c2,
        first_call=t1 - t0,
        n_eqns=len(traced.jaxpr.eqns),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="rmsprop,centered+momentum,adamw")
    ap.add_argument("--impls", default="floor,fused,optax")
    ap.add_argument("--leaves", default="1024")
    ap.add_argument("--size", default="32", help="M params, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dump", default=None, help="folder for the HLO text of each program")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        config, impl, leaves, size = args.child.split("|")
        print(json.dumps(_one(config, impl, int(leaves), int(size), args.dump)))
        return
    print("| config | leaves | M | impl | trace | lower | compile | first call (wall) | eqns |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for size in args.size.split(","):
        for leaves in args.leaves.split(","):
            for config in args.configs.split(","):
                for impl in args.impls.split(","):
                    runs = []
                    for _ in range(args.reps):
                        cmd = [
                            sys.executable,
                            __file__,
                            "--child",
                            f"{config}|{impl}|{leaves}|{size}",
                        ]
                        if args.dump:
                            cmd += ["--dump", args.dump]
                        res = subprocess.run(
                            cmd, capture_output=True, text=True, env=os.environ, check=False
                        )
                        if res.returncode:
                            sys.exit(res.stderr)
                        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
                    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    print(
                        f"| {config} | {leaves} | {size} | {impl} | {med['trace']:.2f} | "
                        f"{med['lower']:.2f} | {med['compile']:.2f} | {med['first_call']:.2f} | "
                        f"{int(med['n_eqns'])} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
