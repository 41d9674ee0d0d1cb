"""Differential test of the native kernel against ``update`` + ``apply_updates``, special values
included (hypothesis: random configurations x random trees x special-value masks).

For one step from random states, every configuration the kernel supports must give

* NaN in exactly the same elements as the pure-JAX path, in the parameters and every state leaf;
* the same +-Inf, and the same finite values up to float32 rounding.

"Up to float32 rounding" is made precise by a NumPy re-statement of each published rule
(:func:`rms_model`, :func:`adam_model`, :func:`sgd_model`) evaluated in float64 with a running
first-order error bound (class :class:`E`): every operation adds one float32 rounding
(``2**-24`` relative, which also covers an FMA that skips a rounding and ``g * (1 / sqrt(x))``
against ``g * rsqrt(x)``), errors propagate through the operations, results below the float32
normal range are flushed to zero (as XLA's CPU code and the kernel do; ``2**-126`` absolute),
and values beyond the float32 range become +-Inf. A value computed from a non-finite operand
(``x / inf = 0``, ``inf + x``) is exact. So the tolerance of an element is what its own
computation can lose to rounding: a few ulps for well-conditioned elements, more where a sum
cancels (``p + u`` with ``p ~ -u``, a momentum buffer, the centered variance
``nu_hat - mu_hat^2``), and unbounded where the rounding decides a guard (a divisor whose error
interval contains 0), which is not compared beyond its NaN positions. The pure-JAX result must
lie within the bound of the re-statement (so the bound is not vacuous and the pure rule is
checked too), and the kernel within twice the bound of the pure-JAX result.

Inputs: parameters, gradients and states with ordinary values (log-uniform 1e-3..1e3, both
signs) and, in a random fraction of elements, NaN, +-Inf, 0, +-1e-40 (denormal), +-3e38 and
+-2e19 (|g|^2 overflows: the documented zero step), 1e-20 (|g|^2 underflows); hyperparameters
include 0 (``eps = 0``: zero divisors), 1 and traced or concrete ``eps``. States are drawn the
way the optimizer makes them (``nu >= 0``) but independently of each other, with specials up to
1e30: a moment near the float32 maximum with a small step count makes ``mu / c1`` overflow, and
there XLA's own result depends on the program around it (it may rewrite ``(mu / c1) / den`` as
``mu / (c1 * den)``), so the pure path is no reference.

Cost: one compilation per configuration (both paths in one program), about 15 s for the default
30 examples on a 2-core machine; set ``RMSJAX_DIFF_EXAMPLES`` for a longer run.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsjax
import rmsjax.compat.keras as keras_optim
import rmsjax.compat.pytorch as torch_optim
from rmsjax import fused, native
from rmsjax._native import call

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel off: {native.status()}"
)

U = 2.0**-24  # float32 unit roundoff
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal; below it XLA flushes to zero
INT32_MAX = 2**31 - 1

SHAPES = {"a": (1,), "b": (7, 5), "c": (150,)}
GRAD_SPECIALS = [np.nan, np.inf, -np.inf, 0.0, 1e-40, -1e-40, 3e38, -3e38, 2e19, -2e19, 1e-20]
PARAM_SPECIALS = [np.nan, np.inf, -np.inf, 0.0, 1e-40, -1e-40, 3e38, -3e38]
STATE_SPECIALS = [np.nan, np.inf, -np.inf, 0.0, 1e-40, -1e-40, 1e30, -1e30]
COUNTS = [0, 1, 7, 1000, INT32_MAX - 1, INT32_MAX]


def _pure_centered_guard() -> bool:
    """Whether the pure centered rule gives variance +inf where nu_hat = +inf (agreed for
    issue 10; the change to rmsjax/transforms/rms.py lands on its own branch). Without it the
    pure rule returns NaN for a finite gradient whose square overflows, where the kernel
    already gives the agreed zero step; those elements are then left out."""
    tx = rmsjax.scale_by_centered_rms(decay=0.5, eps=0.0)
    g = jnp.full([1], 3e38, jnp.float32)
    updates, _ = tx.update(g, tx.init(g))
    return not bool(jnp.isnan(updates).any())


PURE_CENTERED_GUARD = _pure_centered_guard()


# ---- float64 evaluation with a running error bound ----------------------------------------


class E(NamedTuple):
    """Per-element values (float64) and absolute error bounds of a float32 computation."""

    v: np.ndarray
    e: np.ndarray


def exact(x: Any, like: np.ndarray) -> E:
    """An exact float32 input, denormals flushed to zero (XLA and the kernel read them as 0)."""
    v = np.broadcast_to(np.asarray(x, np.float32).astype(np.float64), like.shape).copy()
    v[np.abs(v) < F32_TINY] = 0.0
    return E(v, np.zeros_like(v))


def _result(v: np.ndarray, e: np.ndarray, operands: tuple[E, ...], undecided: Any = False) -> E:
    """One float32 rounding of ``v`` (error bound ``e`` so far), with overflow and flushing.

    The bound is infinite ("unbounded") where an operand's is, where the operation itself is
    undecided by rounding (``undecided``: e.g. inf times a value that may be 0), and near the
    float32 overflow threshold. A value computed from a non-finite operand, or itself
    non-finite, is otherwise exact.
    """
    with np.errstate(all="ignore"):
        unbounded = np.any([np.isinf(x.e) for x in operands], axis=0) | undecided
        finite = np.isfinite(v)
        e = np.where(finite, e, 0.0)
        near = finite & (np.abs(np.abs(v) - F32_MAX) <= e + U * F32_MAX)
        over = finite & (np.abs(v) > F32_MAX) & ~near
        v = np.where(over, np.sign(v) * np.inf, v)
        tiny = (np.abs(v) < F32_TINY) & (v != 0)
        v = np.where(tiny, 0.0, v)
        e = e + np.where(tiny, F32_TINY, U * np.abs(np.where(np.isfinite(v), v, 0.0)))
        inexact = np.all([np.isfinite(x.v) for x in operands], axis=0) & np.isfinite(v)
        e = np.where(inexact, e, 0.0)
        return E(v, np.where(unbounded | near, np.inf, e))


def _may_be_zero(a: E) -> np.ndarray:
    return (np.abs(a.v) <= a.e) & (a.e > 0)


def add(a: E, b: E) -> E:
    with np.errstate(all="ignore"):
        return _result(a.v + b.v, a.e + b.e, (a, b))


def sub(a: E, b: E) -> E:
    with np.errstate(all="ignore"):
        return _result(a.v - b.v, a.e + b.e, (a, b))


def mul(a: E, b: E) -> E:
    with np.errstate(all="ignore"):
        e = np.abs(a.v) * b.e + np.abs(b.v) * a.e + a.e * b.e
        undecided = (np.isinf(a.v) & _may_be_zero(b)) | (np.isinf(b.v) & _may_be_zero(a))
        return _result(a.v * b.v, e, (a, b), undecided)


def div(a: E, b: E) -> E:
    with np.errstate(all="ignore"):
        v = a.v / b.v
        lo = np.abs(b.v) - b.e
        e = (a.e + np.abs(v) * b.e) / lo
        undecided = (np.isfinite(b.v) & (b.e > 0) & ~(lo > 0)) | (
            (b.v == 0) & (b.e == 0) & _may_be_zero(a)
        )
        return _result(v, e, (a, b), undecided)


def sqrt(a: E) -> E:
    with np.errstate(all="ignore"):
        v = np.sqrt(a.v)
        e = np.sqrt(a.v + a.e) - np.sqrt(np.maximum(a.v - a.e, 0.0))
        return _result(v, e, (a,))


def _guarded(out: E, den: E) -> E:
    """``where(den != 0, out, 0)``; unbounded where rounding decides whether ``den`` is 0."""
    zero = (den.v == 0) & (den.e == 0)
    e = np.where(_may_be_zero(den) | np.isinf(den.e), np.inf, out.e)
    return E(np.where(zero, 0.0, out.v), np.where(zero, 0.0, e))


def safe_div(a: E, b: E) -> E:
    """``where(b != 0, a / b, 0)``."""
    return _guarded(div(a, b), b)


def moment_div(a: E, b: E, g: E) -> E:
    """``safe_div``, and 0 where ``b`` is +inf and ``g`` finite (rmsjax._numerics.moment_div)."""
    out = safe_div(a, b)
    zero = (b.v == np.inf) & np.isfinite(g.v)
    return E(np.where(zero, 0.0, out.v), np.where(zero, 0.0, out.e))


def safe_rsqrt_scale(g: E, d2: E) -> E:
    """``where(d2 != 0, g * rsqrt(d2), 0)``."""
    return _guarded(mul(g, div(exact(1.0, g.v), sqrt(d2))), d2)


def max0(a: E) -> E:
    """``max(a, 0)``, NaN propagating (jnp.maximum)."""
    with np.errstate(all="ignore"):
        v = np.where(np.isnan(a.v), np.nan, np.maximum(a.v, 0.0))
        e = np.where(a.v >= 0, a.e, np.maximum(a.v + a.e, 0.0))
        return E(v, np.where(np.isnan(v), 0.0, e))


def debias(decay: np.float32, t: int, like: np.ndarray) -> E:
    """``1 - decay**t`` as JAX computes it in float32 (pow to a few ulps, then 1 - x)."""
    d, t = float(decay), min(t, INT32_MAX)
    power = d**t if d > 0 else 0.0
    log_term = abs(t * math.log(d)) if d > 0 else 0.0
    v = np.full(like.shape, 1.0 - power)
    return E(v, np.full(like.shape, (4 + log_term) * U * power + U * abs(1.0 - power)))


# ---- the published rules, re-stated ---------------------------------------------------------


def _gradient(x: dict[str, E], hp: dict[str, Any], cfg: dict[str, Any]) -> E:
    """The gradient as the rule receives it: negated (``maximize``), plus the coupled decay."""
    g = x["g"]
    if cfg.get("maximize"):
        g = E(-g.v, g.e)
    if cfg.get("decay") == "coupled":
        g = add(g, mul(exact(hp["weight_decay"], g.v), x["p"]))
    return g


def _step_and_trace(s: E, x: dict[str, E], hp: dict[str, Any], cfg: dict[str, Any], out: dict) -> E:
    """The step size and the momentum buffer in the chain's order (``scale_first``: the step
    size inside the buffer), then the decoupled decay; the new parameters."""
    like = s.v
    lr = exact(-np.float32(hp["learning_rate"]), like)
    if cfg["momentum"] is None:
        u = mul(lr, s)
    elif cfg.get("scale_first", True):
        beta = exact(hp["momentum"], like)
        u = mul(lr, s)
        m = add(u, mul(beta, x["trace"]))
        u = add(u, mul(beta, m)) if cfg["nesterov"] else m
        out["trace"] = m
    else:
        beta = exact(hp["momentum"], like)
        m = add(s, mul(beta, x["trace"]))
        u = mul(lr, add(s, mul(beta, m)) if cfg["nesterov"] else m)
        out["trace"] = m
    if cfg.get("decay") == "decoupled":
        # decoupled_weight_decay(wd, lr): the coefficient lr * wd is a float32 product
        coefficient = np.float32(hp["learning_rate"]) * np.float32(hp["weight_decay"])
        u = sub(u, mul(exact(coefficient, like), x["p"]))
    return add(x["p"], u)


def rms_model(x: dict[str, E], hp: dict[str, Any], cfg: dict[str, Any], count: int) -> dict:
    """rmsjax.rmsprop and the presets' RMSprop: [maximize], [coupled decay], [centered] RMS
    scaling, -lr and [trace momentum] in either order, [decoupled decay], p + u."""
    g, like = _gradient(x, hp, cfg), x["g"].v
    decay = np.float32(hp["decay"])
    w_new, w_old = exact(np.float32(1) - decay, like), exact(decay, like)
    nu = add(mul(w_new, mul(g, g)), mul(w_old, x["nu"]))
    corr = debias(decay, count + 1, like) if cfg.get("bias_correction") else exact(1.0, like)
    out: dict[str, E] = {"nu": nu}
    if cfg["centered"]:
        mu = add(mul(w_new, g), mul(w_old, x["mu"]))
        nh, mh = div(nu, corr), div(mu, corr)
        var = max0(sub(nh, mul(mh, mh)))
        var = E(np.where(nh.v == np.inf, np.inf, var.v), np.where(nh.v == np.inf, 0.0, var.e))
        out["mu"] = mu
        if not PURE_CENTERED_GUARD:
            out["pure_lacks_guard"] = E(nh.v == np.inf, nh.e)
    else:
        var = div(nu, corr)
    eps = exact(hp["eps"], like)
    if cfg["eps_in_sqrt"]:
        s = safe_rsqrt_scale(g, add(var, eps))
    else:
        s = safe_div(g, add(sqrt(var), eps))
    out["params"] = _step_and_trace(s, x, hp, cfg, out)
    return out


def adam_model(x: dict[str, E], hp: dict[str, Any], cfg: dict[str, Any], count: int) -> dict:
    """rmsjax.adam / adamw and the presets' Adam and AdamW: [maximize], [coupled decay], Adam
    scaling (or Keras' epsilon-hat form), [+ wd * p], -lr, [decoupled decay], p + u."""
    g, like = _gradient(x, hp, cfg), x["g"].v
    b1, b2 = np.float32(hp["b1"]), np.float32(hp["b2"])
    w1 = exact(np.float32(1) - b1, like)
    mu = add(mul(w1, g), mul(exact(b1, like), x["mu"]))
    nu = add(mul(exact(np.float32(1) - b2, like), mul(g, g)), mul(exact(b2, like), x["nu"]))
    t = min(count + 1, INT32_MAX)
    c1, c2 = debias(b1, t, like), debias(b2, t, like)
    if cfg.get("eps_hat"):
        # alpha = sqrt(1 - b2^t) / (1 - b1^t); u = alpha mu / (sqrt(nu) + eps)
        alpha = div(sqrt(c2), c1)
        s = safe_div(mul(mu, alpha), add(sqrt(nu), exact(hp["eps"], like)))
    else:
        if cfg["nesterov"]:
            c1_next = debias(b1, min(t + 1, INT32_MAX), like)
            mu_hat = add(mul(exact(b1, like), div(mu, c1_next)), mul(w1, div(g, c1)))
        else:
            mu_hat = div(mu, c1)
        eps_root = exact(hp.get("eps_root", 0.0), like)
        den = add(sqrt(add(div(nu, c2), eps_root)), exact(hp["eps"], like))
        s = moment_div(mu_hat, den, g)
    if cfg.get("decay") == "after_rule":
        s = add(s, mul(exact(hp["weight_decay"], like), x["p"]))
    out: dict[str, E] = {"mu": mu, "nu": nu}
    out["params"] = _step_and_trace(s, x, hp, {**cfg, "momentum": None}, out)
    return out


def sgd_model(x: dict[str, E], hp: dict[str, Any], cfg: dict[str, Any], count: int) -> dict:
    """rmsjax.sgd and the presets' SGD: [maximize], [coupled decay], [trace momentum] and -lr in
    either order, [decoupled decay], p + u."""
    out: dict[str, E] = {}
    cfg = {"scale_first": False, **cfg}  # optax's and PyTorch's SGD: the step size last
    out["params"] = _step_and_trace(_gradient(x, hp, cfg), x, hp, cfg, out)
    return out


# ---- configurations -------------------------------------------------------------------------


def _configs() -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    out = []
    for centered in (False, True):
        for eps_in_sqrt in (False, True):
            for momentum, nesterov in ((None, False), (0.9, False), (0.9, True)):
                for bias_correction in (False, True):
                    for eps in (None, 1e-8):  # None: traced; 1e-8: concrete (no guard emitted)
                        cfg = dict(
                            centered=centered,
                            eps_in_sqrt=eps_in_sqrt,
                            momentum=momentum,
                            nesterov=nesterov,
                            bias_correction=bias_correction,
                            eps=eps,
                        )
                        out.append(("rmsprop", tuple(cfg.items())))
    for name in ("adam", "adamw"):
        for nesterov in (False, True):
            for eps in (None, 1e-8):
                out.append((name, (("nesterov", nesterov), ("eps", eps))))
    for momentum, nesterov in ((None, False), (0.9, False), (0.9, True)):
        out.append(("sgd", (("momentum", momentum), ("nesterov", nesterov))))
    # the framework presets' chains: the linear terms around the rules (wd: a weight decay,
    # traced; maximize: PyTorch's sign flip), the step size after the momentum buffer (PyTorch),
    # Keras' epsilon-hat Adam
    for maximize in (False, True):
        for wd in (False, True):
            for centered in (False, True):
                for momentum in (None, 0.9):
                    items = dict(centered=centered, momentum=momentum, wd=wd, maximize=maximize)
                    out.append(("torch_rmsprop", tuple(items.items())))
            out.append(("torch_adam", (("wd", wd), ("maximize", maximize))))
            out.append(("torch_adamw", (("wd", True), ("maximize", maximize))))
            out.append(("torch_sgd", (("momentum", None), ("wd", wd), ("maximize", maximize))))
    for wd in (False, True):
        for centered in (False, True):
            for momentum in (None, 0.9):
                items = dict(centered=centered, momentum=momentum, wd=wd)
                out.append(("keras_rmsprop", tuple(items.items())))
        out.append(("keras_adam", (("wd", wd),)))
        for momentum, nesterov in ((None, False), (0.9, False), (0.9, True)):
            items = dict(momentum=momentum, nesterov=nesterov, wd=wd)
            out.append(("keras_sgd", tuple(items.items())))
    return out


def _preset(make: Callable[..., Any]) -> Callable[..., Any]:
    """A fused factory of a preset ``make(hp, static) -> GradientTransformation`` taking the
    differential test's hyperparameter names."""

    def factory(*, backend: str = "auto", min_native_size: int = 16384, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the preset's default
        return fused.fused(make(**kwargs), backend=backend, min_native_size=min_native_size)

    return factory


def _torch_rmsprop(*, learning_rate, decay, eps, momentum=0, weight_decay=0, wd=False, **kw):
    return torch_optim.rmsprop(
        lr=learning_rate, alpha=decay, eps=eps, momentum=momentum, weight_decay=weight_decay, **kw
    )


def _torch_adam(*, learning_rate, b1, b2, eps, weight_decay=0, wd=False, **kw):
    return torch_optim.adam(
        lr=learning_rate, betas=(b1, b2), eps=eps, weight_decay=weight_decay, **kw
    )


def _torch_adamw(*, learning_rate, b1, b2, eps, weight_decay, wd=True, **kw):
    return torch_optim.adamw(
        lr=learning_rate, betas=(b1, b2), eps=eps, weight_decay=weight_decay, **kw
    )


def _torch_sgd(*, learning_rate, momentum=0, weight_decay=0, wd=False, **kw):
    return torch_optim.sgd(lr=learning_rate, momentum=momentum, weight_decay=weight_decay, **kw)


def _keras_rmsprop(*, learning_rate, decay, eps, momentum=0.0, weight_decay=None, wd=False, **kw):
    return keras_optim.rmsprop(
        learning_rate=learning_rate,
        rho=decay,
        epsilon=eps,
        momentum=momentum,
        weight_decay=weight_decay,
        **kw,
    )


def _keras_adam(*, learning_rate, b1, b2, eps, weight_decay=None, wd=False, **kw):
    return keras_optim.adam(
        learning_rate=learning_rate,
        beta_1=b1,
        beta_2=b2,
        epsilon=eps,
        weight_decay=weight_decay,
        **kw,
    )


def _keras_sgd(*, learning_rate, momentum=0.0, weight_decay=None, wd=False, **kw):
    return keras_optim.sgd(
        learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay, **kw
    )


PRESETS = {
    "torch_rmsprop": _preset(_torch_rmsprop),
    "torch_adam": _preset(_torch_adam),
    "torch_adamw": _preset(_torch_adamw),
    "torch_sgd": _preset(_torch_sgd),
    "keras_rmsprop": _preset(_keras_rmsprop),
    "keras_adam": _preset(_keras_adam),
    "keras_sgd": _preset(_keras_sgd),
}
# What each preset's chain does, for the float64 models (besides its configuration's items).
PRESET_MODEL = {
    "torch_rmsprop": dict(eps_in_sqrt=False, scale_first=False, decay="coupled"),
    "torch_adam": dict(nesterov=False, decay="coupled"),
    "torch_adamw": dict(nesterov=False, decay="decoupled"),
    "torch_sgd": dict(nesterov=False, scale_first=False, decay="coupled"),
    "keras_rmsprop": dict(eps_in_sqrt=True, scale_first=True, nesterov=False, decay="decoupled"),
    "keras_adam": dict(nesterov=False, eps_hat=True, decay="decoupled"),
    "keras_sgd": dict(scale_first=True, decay="decoupled"),
}


def factory_of(name: str) -> Callable[..., Any]:
    return PRESETS[name] if name in PRESETS else getattr(fused, name)


CONFIGS = _configs()
MODELS: dict[str, Callable[..., dict]] = {
    "rmsprop": rms_model,
    "adam": adam_model,
    "adamw": adam_model,
    "sgd": sgd_model,
    "torch_rmsprop": rms_model,
    "torch_adam": adam_model,
    "torch_adamw": adam_model,
    "torch_sgd": sgd_model,
    "keras_rmsprop": rms_model,
    "keras_adam": adam_model,
    "keras_sgd": sgd_model,
}
HP_CHOICES = {
    "learning_rate": [0.0, 1e-3, 0.1, 1.0],
    "decay": [0.0, 0.5, 0.9, 0.999],
    "eps": [0.0, 1e-8, 1e-3],
    "momentum": [0.0, 0.5, 0.9, 1.0],
    "b1": [0.0, 0.9, 0.999],
    "b2": [0.0, 0.9, 0.999],
    "eps_root": [0.0, 1e-8],
    "weight_decay": [0.0, 1e-2, 1.0],
}
TRACED = {
    "rmsprop": ("learning_rate", "decay", "eps", "momentum"),
    "adam": ("learning_rate", "b1", "b2", "eps", "eps_root"),
    "adamw": ("learning_rate", "b1", "b2", "eps", "eps_root", "weight_decay"),
    "sgd": ("learning_rate", "momentum"),
    "torch_rmsprop": ("learning_rate", "decay", "eps", "momentum", "weight_decay"),
    "torch_adam": ("learning_rate", "b1", "b2", "eps", "weight_decay"),
    "torch_adamw": ("learning_rate", "b1", "b2", "eps", "weight_decay"),
    "torch_sgd": ("learning_rate", "momentum", "weight_decay"),
    "keras_rmsprop": ("learning_rate", "decay", "eps", "momentum", "weight_decay"),
    "keras_adam": ("learning_rate", "b1", "b2", "eps", "weight_decay"),
    "keras_sgd": ("learning_rate", "momentum", "weight_decay"),
}


def traced_names(name: str, static: dict[str, Any]) -> tuple[str, ...]:
    """The hyperparameters passed as traced float32 (the others are static)."""
    return tuple(
        k
        for k in TRACED[name]
        if not (k == "eps" and static.get("eps") is not None)
        and not (k == "momentum" and static.get("momentum") is None)
        and not (k == "weight_decay" and name in PRESETS and not static.get("wd"))
    )


def static_kwargs(static_items: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The factory arguments fixed by a configuration (traced ``eps`` and ``momentum`` not)."""
    return {
        k: v
        for k, v in static_items
        if not (k == "eps" and v is None) and not (k == "momentum" and v is not None)
    }


@functools.cache
def compiled(name: str, static_items: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """Both paths of one configuration in one jitted program (one compile per configuration)."""
    static = static_kwargs(static_items)
    factory = factory_of(name)

    def both(hp: dict, p: Any, g: Any, s: Any) -> Any:
        native_opt = factory(**static, **hp, backend="native", min_native_size=0)
        pure_opt = factory(**static, **hp, backend="jax")
        return native_opt.step(p, g, s), pure_opt.step(p, g, s)

    return jax.jit(both)


def _values(rng: np.random.Generator, shape: tuple, specials: list, p: float) -> np.ndarray:
    x = (rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape)).astype(np.float32)
    mask = rng.random(shape) < p
    x[mask] = rng.choice(np.asarray(specials, np.float32), size=int(mask.sum()))
    return x


def _fields(state: Any) -> dict[str, Any]:
    """The per-parameter state trees and the count, by field name (unique in these chains)."""
    out: dict[str, Any] = {}
    is_state = lambda x: hasattr(x, "_fields")
    for sub in jax.tree.leaves(state, is_leaf=is_state):
        for field in getattr(sub, "_fields", ()):
            value = getattr(sub, field)
            if is_state(value):  # a wrapper's inner state (split_real_and_imaginary)
                nested = _fields(value)
                assert not (set(nested) - {"count"}) & set(out), nested
                for k, v in nested.items():
                    out.setdefault(k, v)
                continue
            assert field not in out or field == "count", field
            out.setdefault(field, value)
    return out


def _randomise_state(state: Any, rng: np.random.Generator, p: float, count: int) -> Any:
    def leaf(path: Any, x: Any) -> Any:
        names = {getattr(k, "name", None) for k in path}
        if "count" in names:
            return jnp.asarray(count, x.dtype)
        v = _values(rng, x.shape, STATE_SPECIALS, p)
        return jnp.asarray(np.abs(v) if "nu" in names else v)

    return jax.tree_util.tree_map_with_path(leaf, state)


def _flat(tree: Any) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def check_example(
    name: str,
    static_items: tuple,
    hp_index: int,
    seed: int,
    p_special: float,
    shapes: dict[str, tuple[int, ...]] = SHAPES,
) -> dict[str, int]:
    """Run one example; assert the properties above; return element counts (compared, skipped)."""
    static = dict(static_items)
    rng = np.random.default_rng(seed)
    hp_rng = np.random.default_rng(hp_index)
    hp = {k: np.float32(hp_rng.choice(HP_CHOICES[k])) for k in traced_names(name, static)}
    params = {k: jnp.asarray(_values(rng, s, PARAM_SPECIALS, p_special)) for k, s in shapes.items()}
    grads = {k: jnp.asarray(_values(rng, s, GRAD_SPECIALS, p_special)) for k, s in shapes.items()}
    count = int(rng.choice(COUNTS))
    pure_opt = factory_of(name)(**static_kwargs(static_items), **hp, backend="jax")
    state = _randomise_state(pure_opt.init(params), rng, p_special, count)
    (p_nat, s_nat), (p_ref, s_ref) = compiled(name, static_items)(
        {k: jnp.float32(v) for k, v in hp.items()}, params, grads, state
    )
    # the kernel ran, and only the slots (and params) differ in kind from the pure state
    assert jax.tree.structure(s_nat) == jax.tree.structure(s_ref)
    nat_f, ref_f, in_f = _fields(s_nat), _fields(s_ref), _fields(state)
    if "count" in ref_f:
        assert int(nat_f["count"]) == int(ref_f["count"]) == min(count + 1, INT32_MAX)
    like = _flat(grads)
    x = {"p": exact(_flat(params), like), "g": exact(like, like)}
    slots = [k for k in ("mu", "nu", "trace") if k in in_f]
    for k in slots:
        x[k] = exact(_flat(in_f[k]), like)
    full_hp = {**hp, **{k: v for k, v in static.items() if k == "eps" and v is not None}}
    model_cfg = {"momentum": None, "nesterov": False, **PRESET_MODEL.get(name, {}), **static}
    if name == "adamw":
        model_cfg["decay"] = "after_rule"
    if name in PRESETS and not static.get("wd"):
        model_cfg["decay"] = None
    model = MODELS[name](x, full_hp, model_cfg, count)
    lacks_guard = model.pop("pure_lacks_guard", E(np.zeros(like.shape, bool), like)).v
    assert set(model) == {"params", *slots}
    stats = {"compared": 0, "unbounded": 0}
    for key in model:
        got = _flat(p_nat if key == "params" else nat_f[key])
        want = _flat(p_ref if key == "params" else ref_f[key])
        v, e = model[key]
        if key in ("params", "trace"):
            v, e = np.where(lacks_guard, 0.0, v), np.where(lacks_guard, np.inf, e)
            want = np.where(lacks_guard, got, want)
        where = f"{name} {static} hp={hp} count={count} seed={seed}: {key}"
        bad = np.isnan(got) != np.isnan(want)
        assert not bad.any(), f"{where}: NaN differs at {np.flatnonzero(bad)[:5]}"
        bounded = np.isfinite(e)
        stats["compared"] += int(bounded.sum())
        stats["unbounded"] += int((~bounded).sum())
        nonfinite = bounded & ~np.isfinite(v)
        # non-finite model values: both paths give exactly that (NaN where NaN, same-sign inf)
        for label, arr in (("kernel", got), ("pure", want)):
            same = np.where(np.isnan(v), np.isnan(arr), arr == v)
            bad = nonfinite & ~same
            assert not bad.any(), (
                f"{where}: {label} {arr[bad][:3]} where the rule gives {v[bad][:3]} "
                f"at {np.flatnonzero(bad)[:3]}"
            )
        finite = bounded & np.isfinite(v)
        with np.errstate(invalid="ignore"):
            ref_gap = np.abs(want - v)
            nat_gap = np.abs(got - want)
        bad = finite & ~(ref_gap <= 2 * e)
        assert not bad.any(), (
            f"{where}: pure {want[bad][:3]} vs rule {v[bad][:3]} +- {e[bad][:3]} "
            f"at {np.flatnonzero(bad)[:3]}"
        )
        bad = finite & ~(nat_gap <= 4 * e)
        assert not bad.any(), (
            f"{where}: kernel {got[bad][:3]} vs pure {want[bad][:3]} (bound {e[bad][:3]}) "
            f"at {np.flatnonzero(bad)[:3]}"
        )
    return stats


@settings(
    max_examples=int(os.environ.get("RMSJAX_DIFF_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
)
@given(
    config=st.sampled_from(CONFIGS),
    hp_index=st.integers(0, 2**16),
    seed=st.integers(0, 2**32 - 1),
    p_special=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_kernel_matches_pure_jax_on_special_values(config, hp_index, seed, p_special):
    name, static_items = config
    check_example(name, static_items, hp_index, seed, p_special)


PRESET_CONFIGS = [c for c in CONFIGS if c[0] in PRESETS]


@pytest.mark.parametrize(
    "config", PRESET_CONFIGS, ids=lambda c: "-".join([c[0], *(f"{k}={v}" for k, v in c[1])])
)
def test_every_preset_configuration_matches_pure_jax(config):
    # The hypothesis draw above meets a sample of CONFIGS per run; every configuration of the
    # framework presets' chains (the linear terms around the rules) is compared here once, with
    # special values in 5% of the elements and hyperparameters drawn from HP_CHOICES.
    name, static_items = config
    i = PRESET_CONFIGS.index(config)
    check_example(name, static_items, hp_index=1000 + i, seed=2000 + i, p_special=0.05)


def test_every_configuration_runs_the_kernel():
    # The differential test compares something only if the native side really is the kernel;
    # every preset configuration (a silent pure-JAX fallback would compare the path to itself).
    params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    for name, items in CONFIGS[::7] + PRESET_CONFIGS:
        hp = {k: jnp.float32(0.5) for k in traced_names(name, dict(items))}
        opt = factory_of(name)(**static_kwargs(items), **hp, backend="native", min_native_size=0)
        jaxpr = jax.make_jaxpr(opt.step)(params, params, opt.init(params))
        assert str(jaxpr).count("ffi_call") == 1, (name, items)


# More leaves than one kernel call takes (rmsjax._native.call.LEAVES_PER_CALL), some above the
# size from which a call is split into tasks on XLA's thread pool (64K elements) with odd sizes,
# so that blocks of 32K elements straddle leaf boundaries: the calls of a step run concurrently,
# each in several asynchronous tasks; the numbers must not change.
MANY_SHAPES = {f"w{i:02d}": (3 + 5 * i,) for i in range(40)} | {
    "big": (70_001,),
    "odd": (3, 33_335),
}


@pytest.mark.parametrize(
    "config",
    [
        (
            "rmsprop",
            (
                ("centered", True),
                ("eps_in_sqrt", False),
                ("momentum", 0.9),
                ("nesterov", True),
                ("bias_correction", True),
                ("eps", None),
            ),
        ),
        ("adamw", (("nesterov", False), ("eps", 1e-8))),
        ("sgd", (("momentum", 0.9), ("nesterov", False))),
    ],
    ids=lambda c: c[0],
)
def test_kernel_matches_pure_jax_across_calls_and_threads(config):
    name, static_items = config
    assert len(MANY_SHAPES) > call.LEAVES_PER_CALL
    stats = check_example(name, static_items, 7, 11, 0.05, MANY_SHAPES)
    assert stats["compared"] > 150_000
