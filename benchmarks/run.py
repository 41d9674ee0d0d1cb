"""Optimizer-step benchmark: rmsjax (protocol and fused) against optax, and torch if installed.

One process (with ``--processes``, fresh ones for each case), one case at a time,
implementations interleaved (their order rotates every repetition) so that machine noise hits
all of them alike. Each JAX step is
``jax.jit(step, donate_argnums=(0, 2))`` with ``step(params, grads, state) -> (params, state)``:

* ``floor (no-op)``  returns params and state untouched: no arithmetic, only the cost of
  passing these trees through a donated ``jit`` call, which every implementation also pays
* ``optax``         ``tx.update`` + ``optax.apply_updates`` (optax's own optimizer)
* ``rmsjax``        the same with rmsjax's optax-protocol optimizer (pure JAX)
* ``rmsjax.fused``  ``rmsjax.fused.<opt>(...).step`` (native kernel on CPU when available)
* ``torch.foreach`` / ``torch.fused``  ``torch.optim.<Opt>(..., foreach=True | fused=True)``
  ``.step()`` on tensors with ``.grad`` set (only when torch can be imported)

Each timing runs at least ``MIN_STEPS`` (3) consecutive steps, as a training loop does, so that
a step's dispatch may overlap the previous step's execution. Reported per case: median step
time; the ratio to optax as the median, over repetitions, of the
ratio within one repetition (adjacent in time, so slow drifts of the machine cancel), with its
quartiles; the *marginal* ratio ``(t - t_floor) / (t_optax - t_floor)``, also per repetition
with its median and quartiles: the ratio of what the optimizer itself adds to the floor (see
below), which is what a faster optimizer can change; compile time (trace + lower + compile, wall
clock, and the CPU seconds of each phase, which a loaded machine disturbs less) and the first
call (compile + first step); GB/s at the ideal bytes of the step (each
parameter, gradient and state element read once and each new parameter and state element
written once) next to a bandwidth ceiling measured in the same interleaving (the faster of two
donated, in-place streams: XLA's ``a <- a * b + c``, 16 B per element, and the native kernel's
``p <- p - lr * g``, 12 B per element); and peak memory of the compiled step from XLA's memory
analysis (arguments + outputs - aliased + temporaries). The process RSS high-water mark is
recorded too, and the load average before and after each case (the machine may be shared).

The ``train`` tree times a whole training step instead: forward + backward + optimizer on a
small GPT-shaped model (token embedding, blocks of attention and MLP matrices with their biases
and layer norms, a final norm, the embedding reused for the output), jitted and donated, with
``floor (no-op)`` = forward + backward without any optimizer (the gradients are returned in
place of a state). There the marginal ratio is the optimizer's share as the user sees it.

The per-allocation effect. On some CPUs (seen on an AMD EPYC) the same memory-bound jitted step
runs at one of two speeds, about 1.5x apart, depending on the process and on where its buffers
were allocated, for optax and rmsjax alike; so a ratio between implementations that each step
their own buffers can be off by 1.5x either way, however many repetitions. Two remedies, which
can be combined:

* ``--same-buffers``  floor, optax, rmsjax and rmsjax.fused step ONE set of donated params and
  state (and read one gradient tree): in every repetition each of them, in the rotating order,
  takes the ``(params, state)`` that the previous call returned and runs its steps on them
  (they compute the same update up to float32 rounding, so the carried arrays stay valid, and
  XLA's aliasing of the donated inputs keeps every array at the same address throughout). The
  ratios (per repetition, median and quartiles, as above) then compare the steps on the same
  memory. Only where the layouts allow it: each implementation's params, gradients and state,
  and what its step returns, must have optax's tree structure, leaf shapes and dtypes
  (:func:`shared_layout`, checked abstractly before anything is allocated); otherwise (the
  8-bit and bfloat16 configurations, the training step) the case falls back to own buffers per
  implementation and says why, on stderr, in the ``buffers_note`` of its rows and in
  results.md. The ceilings' streams and torch keep their own buffers.
* ``--processes N``   every case runs in N fresh processes, one after the other (this script,
  restricted to the case, writing its rows to a temporary JSON file), so that the allocation
  effect is sampled N times instead of once; reported: the median over processes of each
  process's median ratio (and marginal), with the smallest and largest process medians
  (``ratio_min`` / ``ratio_max``, in square brackets in results.md); every other number is the
  median over processes, and each process's own figures are kept under ``per_process``.

Usage::

  python benchmarks/run.py            # full: 5 optimizers x 4 trees x {4M, 32M} params, and
                                      # the training step (4M) for rmsprop, centered, adamw
  python benchmarks/run.py --quick    # 4M params, 1 and 64 leaves, fewer repetitions (< 1 min)
  python benchmarks/run.py --sizes 32 --trees 1024 --configs rmsprop --reps 15
  python benchmarks/run.py --lowbit   # memory-efficient state: 8-bit moments and bfloat16
                                      # parameters (32M, 1 and 64 leaves), to results/lowbit/
  python benchmarks/run.py --quick --same-buffers --processes 3   # ratios on one allocation,
                                      # in 3 processes: median [min-max] over processes

The memory-efficient configurations (``--lowbit``, or by name in ``--configs``) keep optax's
float32 step as the reference of every ratio: ``adamw-8bit`` and ``rmsprop-8bit`` store every
moment in 8 bits (``rmsjax.quantized(bits=8)``) in the protocol (pure-JAX) and the fused
optimizer, against optax's float32-state optimizer on the same float32 parameters;
``adamw-bf16`` trains bfloat16 parameters (gradients bfloat16, moments float32) with rmsjax
and the fused step, against optax's float32 AdamW on float32 parameters (so the ratio is what
switching both the parameters and the optimizer costs).

Writes ``<out>/results.json`` and ``<out>/results.md`` (default ``benchmarks/results``); both
start with the machine (:func:`machine.describe`: CPU model, cores, JAX's platforms), as the
per-allocation effect and the ceilings depend on it. ``--sizes`` takes fractions of 2**20 too
(``--sizes 0.25``) for a small trial run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, peak_bytes

import rmsjax
from rmsjax import fused, native
from rmsjax import transforms as T

try:  # optional
    import torch  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - torch is not a dependency
    torch = None

LR = 1e-3
MiB = 2**20
FLOOR = "floor (no-op)"


# --------------------------------------------------------------------------------------------
# Optimizer configurations: (optax, rmsjax protocol, rmsjax fused, torch factory, ideal B/param)
# --------------------------------------------------------------------------------------------


def _rmsjax_adam() -> tuple[str, optax.GradientTransformation]:
    if hasattr(rmsjax, "adam"):
        return "rmsjax", rmsjax.adam(LR)
    return "rmsjax(chain)", optax.chain(T.scale_by_adam(), T.scale_by_learning_rate(LR))


def _rmsjax_sgd() -> tuple[str, optax.GradientTransformation]:
    if hasattr(rmsjax, "sgd"):
        return "rmsjax", rmsjax.sgd(LR, momentum=0.9)
    return "rmsjax(chain)", optax.chain(T.trace(decay=0.9), T.scale_by_learning_rate(LR))


def configs() -> dict[str, dict[str, Any]]:
    adam_name, adam_tx = _rmsjax_adam()
    sgd_name, sgd_tx = _rmsjax_sgd()
    t = torch
    return {
        "rmsprop": dict(
            optax=optax.rmsprop(LR),
            rmsjax=("rmsjax", rmsjax.rmsprop(LR)),
            fused=fused.rmsprop(LR),
            torch=lambda ps, **kw: t.optim.RMSprop(ps, lr=LR, alpha=0.9, eps=1e-8, **kw),
            torch_fused=False,
            bytes=20,  # read p, g, nu; write p, nu
        ),
        "centered+momentum": dict(
            optax=optax.rmsprop(LR, centered=True, momentum=0.9),
            rmsjax=("rmsjax", rmsjax.rmsprop(LR, centered=True, momentum=0.9)),
            fused=fused.rmsprop(LR, centered=True, momentum=0.9),
            torch=lambda ps, **kw: t.optim.RMSprop(
                ps, lr=LR, alpha=0.9, eps=1e-8, centered=True, momentum=0.9, **kw
            ),
            torch_fused=False,
            bytes=36,  # read p, g, mu, nu, m; write p, mu, nu, m
        ),
        "adamw": dict(
            optax=optax.adamw(LR, weight_decay=1e-4),
            rmsjax=("rmsjax", rmsjax.adamw(LR, weight_decay=1e-4)),
            fused=fused.adamw(LR, weight_decay=1e-4),
            torch=lambda ps, **kw: t.optim.AdamW(ps, lr=LR, weight_decay=1e-4, **kw),
            torch_fused=True,
            bytes=28,  # read p, g, mu, nu; write p, mu, nu
        ),
        "adam": dict(
            optax=optax.adam(LR),
            rmsjax=(adam_name, adam_tx),
            fused=fused.adam(LR),
            torch=lambda ps, **kw: t.optim.Adam(ps, lr=LR, **kw),
            torch_fused=True,
            bytes=28,
        ),
        "sgd-momentum": dict(
            optax=optax.sgd(LR, momentum=0.9),
            rmsjax=(sgd_name, sgd_tx),
            fused=fused.sgd(LR, momentum=0.9),
            torch=lambda ps, **kw: t.optim.SGD(ps, lr=LR, momentum=0.9, **kw),
            torch_fused=True,
            bytes=20,  # read p, g, m; write p, m
        ),
        **lowbit_configs(),
    }


# Moments of every state slot in 8 bits (rmsjax's codec: blocks of 256 along the last axis).
Q8 = dict(mu_dtype=rmsjax.quantized(bits=8), nu_dtype=rmsjax.quantized(bits=8))
# The memory-efficient configurations (not in the default run; see --lowbit).
LOWBIT_CONFIGS = ("adamw-8bit", "rmsprop-8bit", "adamw-bf16")


def lowbit_configs() -> dict[str, dict[str, Any]]:
    """Memory-efficient state, each against optax's float32 optimizer (see the docstring)."""
    return {
        "adamw-8bit": dict(
            optax=optax.adamw(LR, weight_decay=1e-4),
            rmsjax=("rmsjax (8-bit)", rmsjax.adamw(LR, weight_decay=1e-4, **Q8)),
            fused=fused.adamw(LR, weight_decay=1e-4, **Q8),
            torch=None,
            torch_fused=False,
            bytes=16,  # read p, g (4 + 4), mu, nu codes (1 + 1); write p (4), codes (1 + 1)
        ),
        "rmsprop-8bit": dict(
            optax=optax.rmsprop(LR),
            rmsjax=("rmsjax (8-bit)", rmsjax.rmsprop(LR, nu_dtype=Q8["nu_dtype"])),
            fused=fused.rmsprop(LR, nu_dtype=Q8["nu_dtype"]),
            torch=None,
            torch_fused=False,
            bytes=14,  # read p, g, nu codes; write p, nu codes
        ),
        "adamw-bf16": dict(
            optax=optax.adamw(LR, weight_decay=1e-4),
            rmsjax=("rmsjax (bf16)", rmsjax.adamw(LR, weight_decay=1e-4)),
            fused=fused.adamw(LR, weight_decay=1e-4),
            torch=None,
            torch_fused=False,
            bytes=22,  # read p, g (2 + 2), mu, nu (4 + 4); write p (2), mu, nu (4 + 4)
            param_dtype=jnp.bfloat16,  # for rmsjax and the fused step; optax: float32
        ),
    }


# --------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------


def tree_shapes(kind: str, n: int) -> dict[str, tuple[int, ...]]:
    """Leaf shapes (float32) totalling about ``n`` parameters."""
    if kind == "1 leaf":
        return {"w": (n,)}
    if kind in ("64 leaves", "1024 leaves"):
        k = int(kind.split()[0])
        return {f"w{i:04d}": (n // k,) for i in range(k)}
    if kind == "transformer":
        # GPT-style blocks (attention qkv/out, 4x MLP, two layer norms) plus an embedding that
        # brings the total to n.
        d, layers = (256, 4) if n <= 8 * MiB else (512, 8)
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(layers):
            b = f"block{i:02d}"
            shapes |= {
                f"{b}.ln1.scale": (d,),
                f"{b}.ln1.bias": (d,),
                f"{b}.attn.qkv.w": (d, 3 * d),
                f"{b}.attn.qkv.b": (3 * d,),
                f"{b}.attn.out.w": (d, d),
                f"{b}.attn.out.b": (d,),
                f"{b}.ln2.scale": (d,),
                f"{b}.ln2.bias": (d,),
                f"{b}.mlp.up.w": (d, 4 * d),
                f"{b}.mlp.up.b": (4 * d,),
                f"{b}.mlp.down.w": (4 * d, d),
                f"{b}.mlp.down.b": (d,),
            }
        shapes |= {"ln_f.scale": (d,), "ln_f.bias": (d,)}
        used = sum(int(np.prod(s)) for s in shapes.values())
        shapes["embed"] = (max(1, (n - used) // d), d)
        return shapes
    raise ValueError(kind)


def make_tree(shapes: dict[str, tuple[int, ...]], key: jax.Array, scale: float) -> Any:
    keys = jax.random.split(key, len(shapes))
    return {
        name: scale * jax.random.normal(k, shape, jnp.float32)
        for (name, shape), k in zip(shapes.items(), keys, strict=True)
    }


def n_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Runners: each has .setup() (compile, returns seconds), .run(k) (k steps), .peak (bytes|None)
# --------------------------------------------------------------------------------------------


def _peak(compiled: Any) -> int | None:
    try:
        return peak_bytes(compiled)
    except Exception:
        return None


class Buffers:
    """The donated ``(params, state)`` that a runner steps: each call takes them and puts the
    step's outputs in their place. Every runner has its own, except under ``--same-buffers``,
    where the implementations of a case hold one ``Buffers`` and step it in turn."""

    def __init__(self, params: Any, state: Any):
        self.p, self.s = params, state


class JaxRunner:
    def __init__(
        self,
        name: str,
        step: Callable,
        params: Any,
        grads: Any,
        state: Any,
        buffers: Buffers | None = None,
    ):
        """``buffers``: a set shared with other runners (then ``params`` and ``state`` are
        ignored); by default a set of this runner's own from ``params`` and ``state``."""
        self.name, self._step = name, step
        self.g = grads
        self.buffers = Buffers(params, state) if buffers is None else buffers
        self.peak: int | None = None
        self.phases: dict[str, float] = {}

    @property
    def p(self) -> Any:
        return self.buffers.p

    @p.setter
    def p(self, value: Any) -> None:
        self.buffers.p = value

    @property
    def s(self) -> Any:
        return self.buffers.s

    @s.setter
    def s(self, value: Any) -> None:
        self.buffers.s = value

    def setup(self) -> float:
        """Trace, lower, compile and run once; returns the compile seconds (wall), and keeps
        the CPU seconds of each phase and the first call's wall seconds in ``phases``."""
        cpu, wall = time.process_time, time.perf_counter
        c0, t0 = cpu(), wall()
        traced = jax.jit(self._step, donate_argnums=(0, 2)).trace(self.p, self.g, self.s)
        c1 = cpu()
        lowered = traced.lower()
        c2 = cpu()
        self.compiled = lowered.compile()
        c3, t1 = cpu(), wall()
        self.peak = _peak(self.compiled)
        self.run(1)  # warm-up (first touch of the output buffers)
        self.phases = dict(
            trace_cpu_s=c1 - c0,
            lower_cpu_s=c2 - c1,
            compile_cpu_s=c3 - c2,
            first_call_s=wall() - t0,
        )
        return t1 - t0

    def run(self, k: int) -> float:
        t0 = time.perf_counter()
        p, s = self.p, self.s
        for _ in range(k):
            p, s = self.compiled(p, self.g, s)
        jax.block_until_ready((p, s))
        self.p, self.s = p, s
        return (time.perf_counter() - t0) / k

    def close(self) -> None:
        self.p = self.s = self.compiled = None


def protocol_step(tx: optax.GradientTransformation, apply: Callable) -> Callable:
    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return apply(params, updates), state

    return step


class StreamRunner(JaxRunner):
    """XLA's in-place stream a <- a * b + c (16 B per element), one of the two ceilings."""

    def __init__(self, n: int):
        key = jax.random.key(7)
        a, b, c = (jax.random.normal(k, (n,), jnp.float32) for k in jax.random.split(key, 3))
        super().__init__("stream (XLA)", None, a, (b, c), None)  # type: ignore[arg-type]

    def setup(self) -> float:
        f = jax.jit(lambda a, bc: a * bc[0] + bc[1], donate_argnums=0)
        self.compiled = f.lower(self.p, self.g).compile()
        self.peak = _peak(self.compiled)
        self.run(1)
        return 0.0

    def run(self, k: int) -> float:
        t0 = time.perf_counter()
        a = self.p
        for _ in range(k):
            a = self.compiled(a, self.g)
        jax.block_until_ready(a)
        self.p = a
        return (time.perf_counter() - t0) / k


def floor_step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    """No arithmetic: what any step with this signature pays to pass the trees through jit."""
    del grads
    return params, state


def native_stream(n: int) -> JaxRunner | None:
    """The native kernel's own in-place stream, p <- p - lr * g (12 B per element), or None."""
    if not native.available():
        return None
    key = jax.random.key(11)
    p, g = (jax.random.normal(k, (n,), jnp.float32) for k in jax.random.split(key))
    opt = fused.sgd(LR, backend="native")
    return JaxRunner("stream (native)", opt.step, p, g, opt.init(p))


class TorchRunner:
    def __init__(self, name: str, factory: Callable, params: Any, grads: Any, **kw: Any):
        self.name, self.peak = name, None
        self.tp = [torch.from_numpy(np.array(x)).reshape(-1) for x in jax.tree.leaves(params)]
        for p, g in zip(self.tp, jax.tree.leaves(grads), strict=True):
            p.grad = torch.from_numpy(np.array(g)).reshape(-1)
        self.opt = factory(self.tp, **kw)

    def setup(self) -> float:
        self.run(1)
        return 0.0

    def run(self, k: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(k):
                self.opt.step()
        return (time.perf_counter() - t0) / k

    def close(self) -> None:
        self.tp = self.opt = None


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return q1, statistics.median(xs), q3


# Consecutive steps per timing, at least: as in a training loop, a step's dispatch (jit's work
# on the arrays of the trees) may overlap the previous step's execution, which XLA runs
# asynchronously; a timing of a single step would add every dispatch to the step instead.
MIN_STEPS = 3


def measure(
    runners: list[Any], reps: int, target_s: float
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Compile every runner, then time them interleaved: ``reps`` rounds, the order rotating
    every round, each timing about ``target_s`` long and at least ``MIN_STEPS`` consecutive
    steps. Returns compile seconds and timings (seconds per step)."""
    compile_s = {r.name: r.setup() for r in runners}
    ks = {r.name: max(MIN_STEPS, int(target_s / max(r.run(1), 1e-6))) for r in runners}
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(reps):
        order = runners[rep % len(runners) :] + runners[: rep % len(runners)]
        for r in order:
            times[r.name].append(r.run(ks[r.name]))
    return compile_s, times


def case_rows(
    base: dict[str, Any],
    runners: list[Any],
    compile_s: dict[str, float],
    times: dict[str, list[float]],
    bytes_per_param: int,
    ceilings: dict[str, float],
) -> list[dict[str, Any]]:
    """One row per runner: medians, paired raw and marginal ratios with quartiles, compile."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ceiling_gbs = max(ceilings.values()) if ceilings else 0.0
    size = base["params"]
    rows = []
    for r in runners:
        t = med[r.name]
        # Paired ratios: each repetition times every implementation back to back, so the ratio
        # within a repetition cancels slow drifts of the machine; report median and quartiles.
        raw = [a / b for a, b in zip(times[r.name], times["optax"], strict=True)]
        marginal = [
            (a - z) / (o - z)
            for a, o, z in zip(times[r.name], times["optax"], times[FLOOR], strict=True)
            if o > z
        ]
        q1, mid, q3 = _quartiles(raw)
        m1, mmid, m3 = _quartiles(marginal) if marginal else (float("nan"),) * 3
        gbs = bytes_per_param * size / t / 1e9 if r.name != FLOOR and bytes_per_param else 0.0
        rows.append(
            dict(
                base,
                impl=r.name,
                native=(r.name == "rmsjax.fused" and native.available()),
                step_ms=1e3 * t,
                step_ms_all=[1e3 * x for x in times[r.name]],
                ratio_vs_optax=mid,
                ratio_q1=q1,
                ratio_q3=q3,
                ratio_of_medians=t / med["optax"],
                marginal=mmid,
                marginal_q1=m1,
                marginal_q3=m3,
                compile_s=compile_s[r.name] if not r.name.startswith("torch") else None,
                **getattr(r, "phases", {}),
                ideal_bytes_per_param=bytes_per_param,
                gbs=gbs,
                ceiling_gbs=ceiling_gbs,
                ceilings_gbs=ceilings,
                frac_of_ceiling=gbs / ceiling_gbs if ceiling_gbs else 0.0,
                peak_mib=None if r.peak is None else r.peak / MiB,
            )
        )
    return rows


def shared_layout(
    steps: dict[str, Callable], trees: dict[str, tuple[Any, Any, Callable]]
) -> str | None:
    """Whether the implementations of a case can step one set of buffers in turn: None if
    every one's ``(params, grads, state)`` (``trees[name]``: params, grads, state init) and
    the ``(params, state)`` its step returns have optax's tree structure, leaf shapes, dtypes
    and weak types; else the first difference, in words. Abstract (``jax.eval_shape``): no
    buffer is allocated."""

    def layout(tree: Any) -> tuple[Any, list[tuple[Any, ...]]]:
        leaves = jax.tree.leaves(tree)
        return jax.tree.structure(tree), [
            (x.shape, x.dtype, bool(getattr(x, "weak_type", False))) for x in leaves
        ]

    shapes = {
        name: (params, grads, jax.eval_shape(init, params))
        for name, (params, grads, init) in trees.items()
    }
    ref_p, ref_g, ref_s = (layout(t) for t in shapes["optax"])
    for name, (params, grads, state) in shapes.items():
        for part, tree, ref in (("params", params, ref_p), ("grads", grads, ref_g)):
            if layout(tree) != ref:
                return f"{name}'s {part} differ from optax's in dtype or layout"
        if layout(state) != ref_s:
            return f"{name}'s state differs from optax's in tree structure, shapes or dtypes"
        out_p, out_s = jax.eval_shape(steps[name], params, grads, state)
        if (layout(out_p), layout(out_s)) != (ref_p, ref_s):
            return f"{name}'s step returns params or state of another layout than it takes"
    return None


def bench_case(
    cfg_name: str,
    cfg: dict[str, Any],
    tree: str,
    n: int,
    reps: int,
    target_s: float,
    same_buffers: bool = False,
) -> list[dict[str, Any]]:
    """Time one case (see the module docstring); ``same_buffers``: floor, optax, rmsjax and
    the fused step share one set of donated buffers, if their layouts allow it."""
    shapes = tree_shapes(tree, n)
    key = jax.random.key(0)
    params = make_tree(shapes, key, 1.0)
    grads = make_tree(shapes, jax.random.fold_in(key, 1), 1e-2)
    size = n_params(params)
    copy = lambda t: jax.tree.map(jnp.copy, t)
    load_before = os.getloadavg()[0]

    # Ceilings first (XLA's and the native kernel's in-place streams), then the floor: a step
    # over the same trees that does no arithmetic.
    streams: list[Any] = [StreamRunner(size)]
    ns = native_stream(size)
    if ns is not None:
        streams.append(ns)
    tx, (label, rtx), fo = cfg["optax"], cfg["rmsjax"], cfg["fused"]
    # rmsjax's parameters (and gradients) in the configuration's dtype (optax keeps float32).
    dtype = cfg.get("param_dtype", jnp.float32)
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
    rparams, rgrads = cast(params), cast(grads)
    steps = {
        FLOOR: floor_step,
        "optax": protocol_step(tx, optax.apply_updates),
        label: protocol_step(rtx, rmsjax.apply_updates),
        "rmsjax.fused": fo.step,
    }
    inits = {
        FLOOR: (params, grads, tx.init),
        "optax": (params, grads, tx.init),
        label: (rparams, rgrads, rtx.init),
        "rmsjax.fused": (rparams, rgrads, fo.init),
    }
    buffers, note = "own", ""
    if same_buffers:
        note = shared_layout(steps, inits) or ""
        if note:
            print(f"{cfg_name}, {tree}: own buffers per implementation: {note}", file=sys.stderr)
        else:
            buffers = "shared"
    runners: list[Any] = [*streams]
    if buffers == "shared":
        # One set for all four: each call takes the (params, state) the previous call returned.
        shared = Buffers(copy(params), tx.init(params))
        for name, step in steps.items():
            runners.append(JaxRunner(name, step, None, grads, None, buffers=shared))
    else:
        for name, step in steps.items():
            p, g, init = inits[name]
            runners.append(JaxRunner(name, step, copy(p), g, init(p)))
    del rparams, inits
    if torch is not None and cfg["torch"] is not None:
        runners.append(TorchRunner("torch.foreach", cfg["torch"], params, grads, foreach=True))
        if cfg["torch_fused"]:
            runners.append(TorchRunner("torch.fused", cfg["torch"], params, grads, fused=True))
    del params

    compile_s, times = measure(runners, reps, target_s)
    stream_bytes = {"stream (XLA)": 16, "stream (native)": 12}
    ceilings = {
        r.name: stream_bytes[r.name] * size / statistics.median(times[r.name]) / 1e9
        for r in streams
    }
    base = dict(
        config=cfg_name,
        tree=tree,
        leaves=len(shapes),
        params=size,
        load=(load_before, os.getloadavg()[0]),
        buffers=buffers,
        buffers_note=note,
    )
    rows = case_rows(base, runners[len(streams) :], compile_s, times, cfg["bytes"], ceilings)
    for r in runners:
        r.close()
    del runners
    gc.collect()
    return rows


# The optimizers timed in the training step.
TRAIN_CONFIGS = ("rmsprop", "centered+momentum", "adamw")


# --------------------------------------------------------------------------------------------
# A whole training step: forward + backward + optimizer on a GPT-shaped model
# --------------------------------------------------------------------------------------------

TRAIN_BATCH, TRAIN_SEQ, HEAD_DIM = 2, 64, 64


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def gpt_loss(params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy of a pre-norm GPT on ``tokens`` (batch, seq + 1); the parameter
    names are those of ``tree_shapes("transformer", n)``, the embedding is also the output."""
    embed = params["embed"]
    vocab, d = embed.shape
    layers = len({k.split(".")[0] for k in params if k.startswith("block")})
    inputs, targets = tokens[:, :-1] % vocab, tokens[:, 1:] % vocab
    b, t = inputs.shape
    x = embed[inputs]
    causal = jnp.tril(jnp.ones((t, t), bool))
    heads = d // HEAD_DIM
    for i in range(layers):
        p = lambda name, i=i: params[f"block{i:02d}.{name}"]
        h = _layer_norm(x, p("ln1.scale"), p("ln1.bias"))
        q, k, v = jnp.split(h @ p("attn.qkv.w") + p("attn.qkv.b"), 3, axis=-1)
        q, k, v = (z.reshape(b, t, heads, HEAD_DIM) for z in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
        attn = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        h = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d)
        x = x + h @ p("attn.out.w") + p("attn.out.b")
        h = _layer_norm(x, p("ln2.scale"), p("ln2.bias"))
        x = x + jax.nn.gelu(h @ p("mlp.up.w") + p("mlp.up.b")) @ p("mlp.down.w") + p("mlp.down.b")
    x = _layer_norm(x, params["ln_f.scale"], params["ln_f.bias"])
    logp = jax.nn.log_softmax(x @ embed.T)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def train_step(update: Callable) -> Callable:
    """``step(params, tokens, state)``: gradients of :func:`gpt_loss`, then ``update``."""

    def step(params: Any, tokens: Any, state: Any) -> tuple[Any, Any]:
        grads = jax.grad(gpt_loss)(params, tokens)
        return update(params, grads, state)

    return step


def train_floor() -> Callable:
    """Forward + backward, no optimizer: the gradients are returned in place of a state (so
    the backward pass is not removed as dead code). A new function for every case, so that
    its compile time is measured every time, not taken from jax's cache of the last case."""

    def step(params: Any, tokens: Any, state: Any) -> tuple[Any, Any]:
        del state
        return params, jax.grad(gpt_loss)(params, tokens)

    return step


def bench_train(
    cfg_name: str,
    cfg: dict[str, Any],
    n: int,
    reps: int,
    target_s: float,
    same_buffers: bool = False,
) -> list[dict[str, Any]]:
    """Time the training step (see the module docstring). Always own buffers per
    implementation: the floor returns the gradients in place of a state, not optax's layout
    (``same_buffers`` only says so)."""
    note = ""
    if same_buffers:
        note = "the training step's floor returns gradients in place of optax's state"
        print(f"{cfg_name}, train step: own buffers per implementation: {note}", file=sys.stderr)
    shapes = tree_shapes("transformer", n)
    key = jax.random.key(0)
    params = make_tree(shapes, key, 0.02)
    size = n_params(params)
    vocab = shapes["embed"][0]
    tokens = jax.random.randint(
        jax.random.fold_in(key, 1), (TRAIN_BATCH, TRAIN_SEQ + 1), 0, vocab, jnp.int32
    )
    copy = lambda t: jax.tree.map(jnp.copy, t)
    load_before = os.getloadavg()[0]
    tx, (label, rtx), fo = cfg["optax"], cfg["rmsjax"], cfg["fused"]
    runners: list[Any] = [
        JaxRunner(FLOOR, train_floor(), copy(params), tokens, jax.tree.map(jnp.zeros_like, params)),
        JaxRunner(
            "optax",
            train_step(protocol_step(tx, optax.apply_updates)),
            copy(params),
            tokens,
            tx.init(params),
        ),
        JaxRunner(
            label,
            train_step(protocol_step(rtx, rmsjax.apply_updates)),
            copy(params),
            tokens,
            rtx.init(params),
        ),
        JaxRunner("rmsjax.fused", train_step(fo.step), copy(params), tokens, fo.init(params)),
    ]
    del params
    # XLA's first compilation of the model's kernels pays one-time costs: not the floor's
    jax.jit(train_floor()).lower(runners[0].p, tokens, runners[0].s).compile()
    compile_s, times = measure(runners, reps, target_s)
    base = dict(
        config=cfg_name,
        tree=f"train step (batch {TRAIN_BATCH}x{TRAIN_SEQ})",
        leaves=len(shapes),
        params=size,
        load=(load_before, os.getloadavg()[0]),
        buffers="own",
        buffers_note=note,
    )
    rows = case_rows(base, runners, compile_s, times, 0, {})
    for r in runners:
        r.close()
    del runners
    gc.collect()
    return rows


# --------------------------------------------------------------------------------------------
# One case in several fresh processes (--processes)
# --------------------------------------------------------------------------------------------

# Each process's own figures, kept in the merged row under "per_process".
PER_PROCESS_KEYS = (
    "step_ms",
    "ratio_vs_optax",
    "ratio_q1",
    "ratio_q3",
    "marginal",
    "marginal_q1",
    "marginal_q3",
    "buffers",
    "load",
)


def _median_or_first(values: list[Any]) -> Any:
    """The median of numbers (NaNs left out; NaN if only NaNs), the first value of anything
    else or of values all equal (so that integers stay integers)."""
    first = values[0]
    if all(v == first for v in values) or isinstance(first, bool):
        return first
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        xs = [v for v in values if v == v]
        return statistics.median(xs) if xs else float("nan")
    if all(isinstance(v, dict) for v in values):
        return {k: _median_or_first([v.get(k) for v in values]) for k in first}
    return first


def merge_processes(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per implementation from the rows of one case timed in several processes (each
    ``runs[i]`` a process's rows, in the same order): every number is the median over processes
    (so ``ratio_vs_optax`` is the median of the processes' median ratios, and ``ratio_q1`` /
    ``ratio_q3`` the medians of their quartiles); ``ratio_min`` / ``ratio_max`` and
    ``marginal_min`` / ``marginal_max`` are the spread of the per-process medians across
    processes; ``per_process`` keeps each process's own figures; ``step_ms_all`` is every
    timing of every process; ``load`` is the lowest load before and the highest after."""
    merged = []
    for i, first in enumerate(runs[0]):
        rows = [run[i] for run in runs]
        if any(r["impl"] != first["impl"] for r in rows):
            raise RuntimeError(f"the processes timed different implementations: {first['impl']}")
        row = {k: _median_or_first([r.get(k) for r in rows]) for k in first}
        ratios = [r["ratio_vs_optax"] for r in rows]
        margs = [r["marginal"] for r in rows if r["marginal"] == r["marginal"]]
        nan = float("nan")
        row.update(
            processes=len(rows),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
            marginal_min=min(margs) if margs else nan,
            marginal_max=max(margs) if margs else nan,
            step_ms_all=[x for r in rows for x in r["step_ms_all"]],
            load=(min(r["load"][0] for r in rows), max(r["load"][1] for r in rows)),
            buffers="shared" if all(r["buffers"] == "shared" for r in rows) else "own",
            per_process=[{k: r.get(k) for k in PER_PROCESS_KEYS} for r in rows],
        )
        merged.append(row)
    return merged


def case_in_processes(
    argv: list[str], size: float, tree: str, name: str, n: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Time one case in ``n`` fresh processes, one after the other: this script with the same
    arguments (``argv``), restricted to the case, each writing its rows to a temporary JSON
    file. Each process allocates its own buffers, so on a CPU where the speed of a step depends
    on the allocation, the per-process ratios sample that effect, and their median and spread
    show it. Returns the merged rows (:func:`merge_processes`) and each process's meta."""
    runs, metas = [], []
    with tempfile.TemporaryDirectory(prefix="rmsjax-bench-") as tmp:
        for i in range(n):
            path = Path(tmp) / f"process{i}.json"
            case = ["--sizes", f"{size:g}", "--trees", tree, "--configs", name]
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--processes", "0"]
            subprocess.run([*cmd, *case, "--json-out", str(path)], check=True)
            out = json.loads(path.read_text())
            runs.append(out["rows"])
            metas.append(out["meta"])
    return merge_processes(runs), metas


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _ratio(r: dict[str, Any]) -> str:
    """Median (quartiles over repetitions), or with --processes: median [min-max over
    processes] of the processes' medians."""
    if "processes" in r:
        return f"{r['ratio_vs_optax']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
    return f"{r['ratio_vs_optax']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"


def _marginal(r: dict[str, Any]) -> str:
    if r["marginal"] != r["marginal"]:  # NaN: optax no slower than the floor in any repetition
        return "n/a"
    if "processes" in r:
        return f"{r['marginal']:.2f} [{r['marginal_min']:.2f}-{r['marginal_max']:.2f}]"
    return f"{r['marginal']:.2f} ({r['marginal_q1']:.2f}-{r['marginal_q3']:.2f})"


def _mparams(n: int) -> str:
    """Parameters in units of 2**20: "4M", "0.25M"."""
    return f"{n / MiB:.0f}M" if n >= MiB else f"{n / MiB:.2g}M"


def _modes(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The paragraphs on --same-buffers and --processes, when they were used."""
    lines = []
    if meta.get("same_buffers"):
        own = {
            (r["config"], r["tree"], _mparams(r["params"])): r["buffers_note"]
            for r in rows
            if r.get("buffers") != "shared"
        }
        lines += [
            f"Same buffers (`--same-buffers`): in each case, `{FLOOR}`, optax, rmsjax and "
            "rmsjax.fused step ONE set of donated params and state in turn, each call taking "
            "what the previous one returned, so that all of them run on the same allocation "
            "(the streams of the ceiling and torch keep their own buffers). Cases with own "
            "buffers per implementation instead: "
            + ("none" if not own else "; ".join(f"{', '.join(k)} ({v})" for k, v in own.items()))
            + ".",
            "",
        ]
    if meta.get("processes"):
        lines += [
            f"Processes (`--processes {meta['processes']}`): every case ran in "
            f"{meta['processes']} fresh processes, one after the other, each with its own "
            "allocations. Ratio and marginal: the median over processes of each process's "
            "median, with the smallest and largest process medians in square brackets; every "
            "other number is the median over processes (results.json keeps each process's "
            "figures under `per_process`).",
            "",
        ]
    return lines


def _load(r: dict[str, Any]) -> str:
    return f"{r['load'][0]:.1f}/{r['load'][1]:.1f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Machine: {meta['machine']}; jax {meta['jax']}, optax {meta['optax']}, "
        f"torch {meta['torch']}; native kernel: {meta['native']}. Load average (1 min) at the "
        f"start and end of the run: {meta['load'][0]:.1f} / {meta['load'][1]:.1f}.",
        "",
        f"Step time: median of {meta['reps']} interleaved timings. Ratio: median over those "
        "repetitions of (step time / optax's step time in the same repetition), with the "
        "quartiles in brackets; lower is better. Marginal: the same for (step time - floor) / "
        "(optax's step time - floor), what the optimizer adds to the floor. GB/s at the ideal "
        "bytes of the step. Ceiling: the faster of two in-place streams timed in the same case, "
        "XLA's `a = a*b + c` (16 B/element) and the native kernel's `p = p - lr*g` "
        f"(12 B/element). `{FLOOR}`: a jitted, donated step over the same trees that returns "
        "them untouched, the cost of passing them through `jit` that every implementation "
        "pays (for the training step: forward + backward without an optimizer). Peak: XLA "
        "memory analysis of the compiled step. Compile: trace + lower + compile (wall s), and "
        "the CPU s of trace / lower / compile; first call: compile + first step (wall s). "
        "Load: load average before / after the case.",
        "",
        *_modes(rows, meta),
        "| optimizer | tree | params | impl | step ms | vs optax | marginal | GB/s | % ceiling "
        "| compile s | cpu s trace/lower/compile | first call s | peak MiB | load |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        comp = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        bw = ("", "") if not r["gbs"] else (f"{r['gbs']:.1f}", f"{100 * r['frac_of_ceiling']:.0f}%")
        phases = (
            f"{r['trace_cpu_s']:.2f}/{r['lower_cpu_s']:.2f}/{r['compile_cpu_s']:.2f}"
            if "trace_cpu_s" in r
            else ""
        )
        first = f"{r['first_call_s']:.2f}" if "first_call_s" in r else ""
        marg = "" if r["impl"] in (FLOOR, "optax") else _marginal(r)
        lines.append(
            f"| {r['config']} | {r['tree']} | {_mparams(r['params'])} | {r['impl']} "
            f"| {r['step_ms']:.2f} | {_ratio(r)} | {marg} | {bw[0]} | {bw[1]} | {comp} "
            f"| {phases} | {first} | {peak} | {_load(r)} |"
        )
    lines.append("")
    of = "The largest of the processes'" if meta.get("processes") else "Process"
    lines.append(f"{of} RSS high-water mark: {meta['rss_peak_mib']:.0f} MiB.")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]]) -> str:
    """One line per case: optax's time, the others as ratios (the README table)."""
    cases: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        cases.setdefault((r["config"], r["tree"], r["params"]), {})[r["impl"]] = r
    has_torch = any(r["impl"].startswith("torch") for r in rows)
    head = (
        "| optimizer | tree | params | optax ms | floor / optax | rmsjax / optax "
        "| fused / optax | fused marginal | fused % ceiling "
        "| first call s optax / fused / floor | peak MiB optax / fused | load |"
    )
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if has_torch:
        head += " torch foreach / optax | torch fused / optax |"
        rule += "---:|---:|"
    lines = [head, rule]
    for (cfg, tree, n), impls in cases.items():
        o, f, z = impls["optax"], impls["rmsjax.fused"], impls[FLOOR]
        r = next(v for k, v in impls.items() if k.startswith("rmsjax") and k != "rmsjax.fused")
        peak = (
            f"{o['peak_mib']:.0f} / {f['peak_mib']:.0f}"
            if o["peak_mib"] is not None and f["peak_mib"] is not None
            else ""
        )
        ceiling = f"{100 * f['frac_of_ceiling']:.0f}%" if f["gbs"] else ""
        line = (
            f"| {cfg} | {tree} | {_mparams(n)} | {o['step_ms']:.2f} "
            f"| {z['ratio_vs_optax']:.2f} | {r['ratio_vs_optax']:.2f} | **{_ratio(f)}** "
            f"| **{_marginal(f)}** | {ceiling} "
            f"| {o['first_call_s']:.2f} / {f['first_call_s']:.2f} / {z['first_call_s']:.2f} "
            f"| {peak} | {_load(f)} |"
        )
        if has_torch:
            tf = impls.get("torch.foreach")
            tu = impls.get("torch.fused")
            line += f" {tf['ratio_vs_optax']:.2f} |" if tf else " |"
            line += f" {tu['ratio_vs_optax']:.2f} |" if tu else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4M params, 1 and 64 leaves (< 1 min)")
    ap.add_argument(
        "--sizes", default=None, help="comma-separated M (2**20) params, e.g. 4,32 or 0.25"
    )
    ap.add_argument("--trees", default=None, help="comma-separated: 1,64,1024,transformer,train")
    ap.add_argument("--configs", default=None, help="comma-separated optimizer names")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--summarize", default=None, help="only print the summary of a results.json")
    ap.add_argument(
        "--lowbit",
        action="store_true",
        help="the memory-efficient configurations (32M, 1 and 64 leaves) into <out>/lowbit",
    )
    ap.add_argument(
        "--same-buffers",
        action="store_true",
        help="floor, optax, rmsjax and rmsjax.fused step one set of donated params/state in "
        "turn (each call takes what the previous returned), so that the ratios do not depend "
        "on where each implementation's buffers were allocated; a case whose implementations "
        "differ from optax's state layout (8-bit, bfloat16, the training step) falls back to "
        "own buffers per implementation and says why",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="run every case in N fresh processes, one after the other, and report the median "
        "over processes of each process's median ratio with the min-max across processes "
        "(default 0: every case in this process)",
    )
    ap.add_argument(
        "--json-out",
        default=None,
        help="write only the results JSON, to this file (what --processes asks of each process)",
    )
    args = ap.parse_args(argv)
    if args.summarize:
        print(summary(json.loads(Path(args.summarize).read_text())["rows"]), end="")
        return 0

    tree_names = {"1": "1 leaf", "64": "64 leaves", "1024": "1024 leaves"}
    tree_names["transformer"] = "transformer"
    sizes: list[float]
    if args.quick:
        sizes, trees, reps, target = [4], ["1", "64"], 3, 0.015
    else:
        sizes, trees, reps, target = [4, 32], ["1", "64", "1024", "transformer", "train"], 9, 0.05
    if args.lowbit:
        sizes, trees = [32], ["1", "64"]
    if args.sizes:
        sizes = [float(s) for s in args.sizes.split(",")]
    if args.trees:
        trees = args.trees.split(",")
    reps = args.reps or reps
    all_cfgs = configs()
    default = LOWBIT_CONFIGS if args.lowbit else [n for n in all_cfgs if n not in LOWBIT_CONFIGS]
    names = args.configs.split(",") if args.configs else list(default)
    if args.lowbit and args.out == ap.get_default("out"):
        args.out = str(Path(args.out) / "lowbit")
    # The training step: once, at the smallest size, for the optimizers of TRAIN_CONFIGS.
    cases = [
        (size, tree, name)
        for size in sizes
        for tree in trees
        for name in names
        if tree != "train" or (size == min(sizes) and name in TRAIN_CONFIGS)
    ]

    print(native.status(), file=sys.stderr)
    rows: list[dict[str, Any]] = []
    process_metas: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    for size, tree, name in cases:
        n = int(size * MiB)
        if args.processes > 0:
            case, metas = case_in_processes(argv, size, tree, name, args.processes)
            process_metas += metas
        elif tree == "train":
            case = bench_train(name, all_cfgs[name], n, reps, target, args.same_buffers)
        else:
            case = bench_case(
                name, all_cfgs[name], tree_names[tree], n, reps, target, args.same_buffers
            )
        for r in case:
            print(
                f"{name:18s} {r['tree'][:16]:16s} {size:4g}M {r['impl']:14s} "
                f"{r['step_ms']:8.2f} ms  x{_ratio(r)}  marginal "
                f"{_marginal(r)}  {r['gbs']:6.1f} GB/s  compile "
                + ("-" if r["compile_s"] is None else f"{r['compile_s']:.2f}s")
                + f"  load {_load(r)}  {r['buffers']} buffers",
                file=sys.stderr,
            )
        rows += case
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta = dict(
        machine=describe(),
        jax=jax.__version__,
        optax=optax.__version__,
        torch=None if torch is None else torch.__version__,
        native=native.status(),
        reps=reps,
        same_buffers=args.same_buffers,
        processes=args.processes,
        load=(load_start, os.getloadavg()[0]),
        wall_s=time.perf_counter() - t_start,
        # With --processes: the largest of the processes' high-water marks.
        rss_peak_mib=max([rss] + [m["rss_peak_mib"] for m in process_metas]),
        argv=argv,
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "results.md").write_text(markdown(rows, meta) + "\n" + summary(rows))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
