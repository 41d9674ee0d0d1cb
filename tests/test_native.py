"""The fused step (rmsjax.fused), its native CPU kernel (rmsjax.native) and how it is built.

References: the pure-JAX path of the same optimizer (``update`` + ``apply_updates``, itself
checked against optax elsewhere), optax called live, ``jax.ffi.include_dir()``, the CPU flags
in /proc/cpuinfo, and hashlib over the kernel source. No timing here.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from rmsjax import fused, native
from rmsjax._native import build as recipe
from rmsjax._native import call, table
from rmsjax.fused import plans, primitive
from tests.common import loss

ROOT = Path(__file__).resolve().parents[1]
HAS_CXX = recipe.find_compiler() is not None

NATIVE = native.available()
# The trees here are small: send every float32 leaf to the kernel so that it is what is tested
# (by default leaves under fused.MIN_NATIVE_SIZE elements take the compiled pure-JAX rule).
SMALL = {"min_native_size": 0}


needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernel off: {native.status()}")

SCHED = optax.exponential_decay(0.05, transition_steps=3, decay_rate=0.5)
WD_SCHED = optax.linear_schedule(0.1, 0.01, 5)

CONFIGS = {
    "rmsprop": lambda b: fused.rmsprop(0.01, backend=b, **SMALL),
    "rmsprop_tf1": lambda b: fused.rmsprop(
        0.01,
        decay=0.95,
        eps=1e-6,
        initial_scale=1.0,
        backend=b,
        **SMALL,
    ),
    "rmsprop_eps_outside": lambda b: fused.rmsprop(0.01, eps_in_sqrt=False, backend=b, **SMALL),
    "rmsprop_bias_correction": lambda b: fused.rmsprop(
        0.01, bias_correction=True, backend=b, **SMALL
    ),
    "rmsprop_momentum_schedule": lambda b: fused.rmsprop(SCHED, momentum=0.9, backend=b, **SMALL),
    "centered_momentum": lambda b: fused.rmsprop(
        0.01, centered=True, momentum=0.9, backend=b, **SMALL
    ),
    "centered_nesterov_torch": lambda b: fused.rmsprop(
        0.01,
        centered=True,
        momentum=0.5,
        nesterov=True,
        eps_in_sqrt=False,
        backend=b,
        **SMALL,
    ),
    # At t=1 the bias-corrected variance is g^2 - g^2 = 0 up to rounding, so the step
    # g/sqrt(var + eps) amplifies one-ulp differences unless eps dominates the rounding noise.
    "centered_bias_correction": lambda b: fused.rmsprop(
        0.01,
        eps=0.1,
        centered=True,
        bias_correction=True,
        backend=b,
        **SMALL,
    ),
    "adamw": lambda b: fused.adamw(0.01, weight_decay=0.1, backend=b, **SMALL),
    "adamw_schedules_nesterov": lambda b: fused.adamw(
        SCHED,
        weight_decay=WD_SCHED,
        eps_root=1e-8,
        nesterov=True,
        backend=b,
        **SMALL,
    ),
    "adam": lambda b: fused.adam(0.01, backend=b, **SMALL),
    "nadam_eps0": lambda b: fused.adam(0.01, eps=0.0, nesterov=True, backend=b, **SMALL),
    "sgd": lambda b: fused.sgd(0.1, backend=b, **SMALL),
    "sgd_momentum": lambda b: fused.sgd(0.05, momentum=0.9, backend=b, **SMALL),
    "sgd_nesterov_schedule": lambda b: fused.sgd(
        SCHED, momentum=0.9, nesterov=True, backend=b, **SMALL
    ),
}


def mixed() -> dict:
    """Scalar, vector, matrix and 3-D float32 leaves, a None leaf and a bfloat16 leaf."""
    rng = np.random.default_rng(1)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "scalar": f32(),
        "layer": {"w": f32(40, 3), "b": f32(3), "frozen": None},
        "pair": (f32(2, 3, 2), f32(5)),
        "half": jnp.asarray(rng.normal(size=7), jnp.bfloat16),
    }


def _loss(params):
    return loss(jax.tree.map(lambda x: x.astype(jnp.float32), params))


def run_fused(opt, params, steps=6):
    """Params and state after ``steps`` fused steps (one jitted scan)."""

    def body(carry, _):
        p, s = carry
        return opt.step(p, jax.grad(_loss)(p), s), None

    return jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[0])(params)


def run_protocol(opt, params, steps=6, apply=rmsjax.apply_updates):
    """The same with ``update`` + ``apply_updates`` (the optax protocol)."""

    def body(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(_loss)(p), s, p)
        return (apply(p, u), s), None

    return jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[0])(params)


def assert_close(actual, expected):
    """Equal to float32 rounding, relative to each array's scale (NaN only where NaN)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0, where=np.isfinite(e))))
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=2e-6 * scale)


def uses_kernel(opt, params) -> bool:
    grads = jax.tree.map(jnp.ones_like, params)
    return "ffi_call" in str(jax.make_jaxpr(opt.step)(params, grads, opt.init(params)))


def test_native_builds_where_a_compiler_exists():
    has_cxx = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    if not has_cxx or os.environ.get("RMSJAX_NATIVE", "1") == "0":
        pytest.skip("no C++ compiler, or native path disabled on purpose")
    assert native.available(), native.status()
    assert native.status().startswith(("native (installed): ", "native (built on first use): "))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_matches_pure_jax(name):
    params = mixed()
    opt = CONFIGS[name]("auto")
    if NATIVE:
        assert uses_kernel(opt, params)
    # backend="jax" is update + apply_updates (the optax protocol) by construction
    assert_close(run_fused(opt, params), run_fused(CONFIGS[name]("jax"), params))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("centered_momentum", "single_array"),
        ("centered_momentum", "many_leaves"),
        ("adamw", "many_leaves"),
        ("adamw", "all_none_but_one"),
    ],
)
def test_tree_shapes(name, shape, monkeypatch):
    monkeypatch.setattr(call, "LEAVES_PER_CALL", 5)  # so that many_leaves needs three calls
    rng = np.random.default_rng(2)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    params = {
        "single_array": f32(33, 5),
        "scalar": f32(),
        "many_leaves": [f32(int(n)) for n in rng.integers(1, 300, size=12)],
        "all_none_but_one": {"a": None, "b": (None, f32(9)), "c": None},
    }[shape]
    opt = CONFIGS[name]("auto")
    assert_close(run_fused(opt, params), run_fused(CONFIGS[name]("jax"), params))


@pytest.mark.parametrize(
    "name, ours, theirs",
    [
        ("rmsprop", lambda: fused.rmsprop(0.01, **SMALL), lambda: optax.rmsprop(0.01)),
        (
            "centered_momentum",
            lambda: fused.rmsprop(0.01, centered=True, momentum=0.9, **SMALL),
            lambda: optax.rmsprop(0.01, centered=True, momentum=0.9),
        ),
        (
            "adamw",
            lambda: fused.adamw(0.01, weight_decay=0.1, **SMALL),
            lambda: optax.adamw(0.01, weight_decay=0.1),
        ),
        ("adam", lambda: fused.adam(0.01, **SMALL), lambda: optax.adam(0.01)),
        (
            "sgd_nesterov",
            lambda: fused.sgd(0.05, momentum=0.9, nesterov=True, **SMALL),
            lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
        ),
    ],
)
def test_fused_step_matches_optax(name, ours, theirs):
    params = {k: v for k, v in mixed().items() if k != "half"}
    got, _ = run_fused(ours(), params, steps=8)
    want, _ = run_protocol(theirs(), params, steps=8, apply=optax.apply_updates)
    assert_close(got, want)


@needs_native
def test_donated_step_is_in_place():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)}
    opt = fused.rmsprop(0.01, centered=True, momentum=0.9)
    state = opt.init(params)
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    hlo = step.lower(params, grads, state).compile().as_text()
    assert "custom-call" in hlo
    assert " copy(" not in hlo  # no defensive copies: the kernel writes the donated buffers
    p_ptr = params["w"].unsafe_buffer_pointer()
    nu_ptr = state[0].nu["w"].unsafe_buffer_pointer()
    new_params, new_state = step(params, grads, state)
    assert params["w"].is_deleted() and state[0].nu["w"].is_deleted()
    assert new_params["w"].unsafe_buffer_pointer() == p_ptr
    assert new_state[0].nu["w"].unsafe_buffer_pointer() == nu_ptr


def test_traced_hyperparameters_do_not_recompile():
    params = mixed()
    grads = jax.grad(_loss)(params)

    def step(lr, decay, p, s, backend="auto"):
        opt = fused.rmsprop(lr, decay=decay, momentum=0.9, backend=backend, **SMALL)
        return opt.step(p, grads, s)

    jitted = jax.jit(step)
    reference = jax.jit(lambda *a: step(*a, backend="jax"))
    state = fused.rmsprop(0.1, momentum=0.9).init(params)
    for lr, decay in ((0.1, 0.9), (0.02, 0.5), (0.3, 0.99)):
        lr, decay = jnp.float32(lr), jnp.float32(decay)
        assert_close(jitted(lr, decay, params, state), reference(lr, decay, params, state))
    assert jitted._cache_size() == 1


def test_inject_hyperparams_matches_optax():
    params = mixed()
    ours = fused.inject_hyperparams(fused.rmsprop)(
        learning_rate=SCHED, decay=0.95, momentum=0.9, **SMALL
    )
    theirs = optax.inject_hyperparams(rmsjax.rmsprop)(learning_rate=SCHED, decay=0.95, momentum=0.9)
    if NATIVE:
        assert uses_kernel(ours, params)
    got = run_fused(ours, params, steps=5)
    want = run_protocol(theirs, params, steps=5)
    assert_close(got, want)
    last_lr = float(SCHED(4))  # the rate the fifth step used
    assert float(got[1].hyperparams["learning_rate"]) == pytest.approx(last_lr)


def test_grad_through_the_step():
    params = {k: v for k, v in mixed().items() if k != "half"}

    def objective(p, lr, backend):
        opt = fused.rmsprop(lr, centered=True, momentum=0.9, backend=backend, **SMALL)
        new_p, _ = opt.step(p, jax.grad(_loss)(p), opt.init(p))
        return _loss(new_p)

    lr = jnp.float32(0.05)
    grad = jax.jit(jax.grad(objective, argnums=(0, 1)), static_argnums=2)
    got, want = grad(params, lr, "auto"), grad(params, lr, "jax")
    assert_close(got, want)
    # and the learning-rate derivative against a central finite difference
    h = 1e-2
    value = jax.jit(objective, static_argnums=2)
    fd = (value(params, lr + h, "auto") - value(params, lr - h, "auto")) / (2 * h)
    np.testing.assert_allclose(float(got[1]), float(fd), rtol=2e-2)


def test_vmap_over_a_batch_of_problems():
    params = mixed()
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), params)
    grads = jax.tree.map(lambda x: jnp.cos(x.astype(jnp.float32)).astype(x.dtype), batch)
    results = {}
    for backend in ("auto", "jax"):
        opt = fused.adamw(0.01, weight_decay=0.1, backend=backend, **SMALL)
        states = jax.vmap(opt.init)(batch)
        results[backend] = jax.jit(jax.vmap(opt.step))(batch, grads, states)
    assert_close(results["auto"], results["jax"])


@pytest.mark.filterwarnings("ignore::rmsjax.fused.NativeFallbackWarning")
def test_fallback_when_the_kernel_is_unavailable(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    params = mixed()
    opt = fused.rmsprop(0.01, centered=True, momentum=0.9, **SMALL)
    assert not uses_kernel(opt, params)
    assert_close(run_fused(opt, params), run_protocol(opt, params))
    with pytest.raises(RuntimeError, match="backend='native'"):
        fused.rmsprop(0.01, backend="native").step(params, params, opt.init(params))


def test_build_reports_a_missing_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-rmsjax")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native.build(force=True)


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend"):
        fused.sgd(0.1, backend="cuda")
    with pytest.raises(ValueError, match="learning_rate"):
        fused.adam(-1.0)


# ---- the fused factories are derived from the protocol optimizers ----------------------------

PROTOCOL = {
    "rmsprop": rmsjax.rmsprop,
    "adam": rmsjax.adam,
    "adamw": rmsjax.adamw,
    "sgd": rmsjax.sgd,
}


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_fused_factory_has_the_protocol_signature_plus_backend(name):
    ours, theirs = inspect.signature(getattr(fused, name)), inspect.signature(PROTOCOL[name])
    extra = [p for p in ours.parameters.values() if p.name not in theirs.parameters]
    assert [p.name for p in extra] == ["backend", "min_native_size"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert [p for p in ours.parameters.values() if p.name in theirs.parameters] == list(
        theirs.parameters.values()
    )
    assert getattr(fused, name).__doc__.count(PROTOCOL[name].__doc__.strip().splitlines()[0]) == 1


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("rmsprop", {"learning_rate": None}),
        ("adam", {"learning_rate": None}),
        ("sgd", {"learning_rate": -1.0}),
        ("rmsprop", {"learning_rate": 0.1, "decay": 1.0}),
        ("adamw", {"learning_rate": 0.1, "weight_decay": -1.0}),
        ("sgd", {"learning_rate": 0.1, "momentum": 2.0}),
    ],
)
def test_fused_factories_validate_as_the_protocol_optimizers(name, kwargs):
    def outcome(factory):
        try:
            opt = factory(**kwargs)
        except Exception as err:  # the error itself is what is compared
            return type(err), str(err)
        params = {"w": jnp.ones(4, jnp.float32)}
        return "ok", jax.tree.map(np.asarray, opt.update(params, opt.init(params), params))

    theirs = outcome(PROTOCOL[name])
    ours = outcome(getattr(fused, name))
    if theirs[0] == "ok":  # accepted by both: same state and updates
        assert ours[0] == "ok"
        jax.tree.map(np.testing.assert_array_equal, ours[1], theirs[1])
    else:
        assert ours == theirs


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_init_and_update_are_the_protocol_optimizers(name):
    params = {k: v for k, v in mixed().items() if k != "half"}
    grads = jax.grad(_loss)(params)
    ours, theirs = getattr(fused, name)(0.05), PROTOCOL[name](0.05)
    state = ours.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(theirs.init(params))
    got = jax.jit(ours.update)(grads, state, params)
    want = jax.jit(theirs.update)(grads, state, params)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_fuse_derives_a_factory_from_any_optimizer_factory():
    opt = fused.fuse(rmsjax.rmsprop)(0.01, centered=True, backend="jax")
    assert isinstance(opt, fused.FusedOptimizer)
    # a rule the kernel does not have: still a fused optimizer, whose steps run the pure chain
    adagrad = fused.fuse(rmsjax.adagrad)(0.1, min_native_size=0)
    params = {"w": jnp.arange(6.0)}
    state = adagrad.init(params)
    assert "ffi_call" not in str(jax.make_jaxpr(adagrad.step)(params, params, state))
    with pytest.raises(TypeError, match="callable returning an optax GradientTransformation"):
        fused.fuse(rmsjax.adagrad(0.1))


# ---- the state slots are found by state type and field name ----------------------------------


def test_state_slots_are_found_by_type_and_field():
    nu = {"w": jnp.ones(3)}
    # optax's own state types (rmsjax adopts them) anywhere in the state, any nesting
    state = (
        optax.EmptyState(),
        {"inner": (optax.ScaleByRmsState(nu=nu), optax.TraceState(trace=nu))},
    )
    rms, trace = (optax.ScaleByRmsState,), (optax.TraceState,)
    assert plans.find_state(state, rms, "nu").nu is nu
    new = plans.replace_field(state, trace, "trace", {"w": jnp.zeros(3)})
    assert float(new[1]["inner"][1].trace["w"].sum()) == 0.0
    assert new[1]["inner"][0].nu["w"] is nu["w"]  # the other sub-states are kept
    with pytest.raises(plans.StateLayoutError, match=r"exactly one .* field 'mu'.* found 0"):
        plans.find_state(state, rms, "mu")
    twice = (optax.TraceState(trace=nu), optax.TraceState(trace=nu))
    with pytest.raises(plans.StateLayoutError, match="found 2"):
        plans.find_state(twice, trace, "trace")


# ---- the operand table: one definition for Python and C++ -------------------------------------


def test_table_header_names_every_operand_in_table_order():
    header = recipe.header()
    assert f"kTableHash = 0x{table.TABLE_HASH:015x};" in header
    camel = lambda n: "k" + "".join(part.capitalize() for part in n.split("_"))
    for kind in table.KINDS:
        body = header.split(f"namespace {kind.name} {{", 1)[1].split("}  // namespace", 1)[0]
        assert f"kId = {kind.id};" in body
        for section, names in (
            ("scalar", kind.scalars),
            ("slot", [s.name for s in kind.slots]),
        ):
            line = re.search(rf"namespace {section} {{ enum : int {{ (.*) }}; }}", body)[1]
            want = [f"{camel(n)} = {i}" for i, n in enumerate(names)] + [f"kCount = {len(names)}"]
            assert line.split(", ") == want
        flags = re.search(r"namespace flag { enum : int64_t { (.*) }; }", body)[1]
        assert flags.split(", ")[:-1] == [
            f"{camel(n)} = {1 << i}" for i, n in enumerate(kind.flags)
        ]


def test_table_rejects_wrong_flags_and_gives_the_present_slots():
    rms = table.kind("rms")
    flags = {
        "centered": True,
        "eps_in_sqrt": True,
        "momentum": False,
        "nesterov": False,
        "scale_first": True,
    }
    assert table.present_slots(rms, flags) == ("mu", "nu")
    assert table.flag_bits(rms, flags) == 0b10011
    with pytest.raises(ValueError, match="takes exactly the flags"):
        table.flag_bits(rms, {**flags, "weight_decay": True})  # adam's, not rms'
    with pytest.raises(ValueError, match="takes exactly the flags"):
        table.flag_bits(rms, {k: v for k, v in flags.items() if k != "scale_first"})
    with pytest.raises(ValueError, match="at most one of the flags"):
        table.flag_bits(rms, {**flags, "coupled_decay": True, "decoupled_decay": True})
    with pytest.raises(KeyError, match="no kernel kind 'lion'"):
        table.kind("lion")


def _sgd_operands(n=4):
    p, g, m = (jnp.full(n, v, jnp.float32) for v in (1.0, 0.5, 0.25))
    return p, g, m


def test_kernel_call_checks_operand_names_at_trace_time():
    sgd = table.kind("sgd")
    flags = {"momentum": True, "nesterov": False, "scale_first": False}
    p, g, m = _sgd_operands()
    with pytest.raises(ValueError, match="takes the scalars"):
        call.kernel_call(sgd, flags, {"step_size": -0.1}, [p], [g], {"trace": [m]})
    scalars = {"step_size": -0.1, "momentum": 0.9, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="takes the slots"):
        call.kernel_call(sgd, flags, scalars, [p], [g], {})


@needs_native
@pytest.mark.parametrize(
    "change, message",
    [
        ({"table": 12345}, "is not the one this library was built from"),
        ({"n_scalars": 4}, "sgd takes 3 scalars, got 4"),
        ({"leaves": 2}, "takes 3 operands and 2 results per leaf"),
        ({"flags": 1 << 9}, "unknown flag bits"),
        # coupled_decay and decoupled_decay (bits 4 and 5) exclude each other
        ({"flags": 1 | 1 << 4 | 1 << 5}, "exclude each other"),
        ({"kind": 7}, "unknown kind 7"),
        ({"drop_slot": True}, "takes 3 operands and 2 results per leaf; got 2 and 1"),
    ],
)
def test_kernel_rejects_operands_that_do_not_match_the_table(change, message):
    # The C++ side checks every call against the table it was built from and returns an FFI
    # error (raised by JAX) rather than reading misplaced operands.
    p, g, m = _sgd_operands()
    scalars = jnp.asarray([-0.1, 0.9, 0.0, 0.0][: change.get("n_scalars", 3)], jnp.float32)
    operands = [scalars, p, g] + ([] if change.get("drop_slot") else [m])
    results = [jax.ShapeDtypeStruct(p.shape, jnp.float32)] * (1 if change.get("drop_slot") else 2)
    attrs = {
        "kind": np.int64(change.get("kind", table.kind("sgd").id)),
        "flags": np.int64(change.get("flags", 1)),  # momentum
        "leaves": np.int64(change.get("leaves", 1)),
        "table": np.int64(change.get("table", table.TABLE_HASH)),
    }
    call = jax.ffi.ffi_call(native.TARGET, results)
    with pytest.raises(Exception, match=re.escape(message)):
        jax.block_until_ready(jax.jit(lambda *ops: call(*ops, **attrs))(*operands))
    # and the same call with the table's operands works
    if change.get("drop_slot") is None:
        good = {**attrs, "kind": np.int64(2), "flags": np.int64(1), "leaves": np.int64(1)}
        good["table"] = np.int64(table.TABLE_HASH)
        ok = jax.jit(lambda *ops: call(*ops, **good))(jnp.asarray([-0.1, 0.9, 0.0]), p, g, m)
        np.testing.assert_allclose(np.asarray(ok[1]), 0.5 + 0.9 * 0.25, rtol=1e-7)


# ---- issue 10: a non-finite gradient is never hidden -------------------------------------------


@needs_native
@pytest.mark.parametrize(
    "name, make, bad",
    [
        ("adam", lambda: fused.adam(1e-3, backend="native"), np.nan),
        ("rmsprop", lambda: fused.rmsprop(1e-3, backend="native"), np.nan),
        (
            "rmsprop_eps_outside",
            lambda: fused.rmsprop(1e-3, eps_in_sqrt=False, backend="native"),
            np.nan,
        ),
        ("adamw", lambda: fused.adamw(1e-3, backend="native"), np.nan),
        (
            "centered_momentum_nan",
            lambda: fused.rmsprop(1e-3, centered=True, momentum=0.9, backend="native"),
            np.nan,
        ),
        (
            "centered_momentum_inf",
            lambda: fused.rmsprop(1e-3, centered=True, momentum=0.9, backend="native"),
            np.inf,
        ),
    ],
)
def test_a_non_finite_gradient_is_not_hidden(name, make, bad):
    # The reproducer of issue 10: one bad gradient element, then ten clean steps. The pure path
    # leaves that parameter NaN; the kernel used to keep it at its old value forever (its
    # guards tested den > 0, which is False for NaN) while the state was NaN.
    n = fused.MIN_NATIVE_SIZE  # the smallest leaf the kernel takes by default
    params = {"w": jnp.ones(n, jnp.float32)}
    clean = {"w": jnp.full(n, 0.1, jnp.float32)}
    results = {}
    for backend, opt in (("native", make()), ("jax", make()._replace(step=None))):
        step = jax.jit(opt.step) if backend == "native" else None
        if backend == "native":
            assert uses_kernel(opt, params)
        p, s = params, opt.init(params)
        for t in range(11):
            g = {"w": clean["w"].at[0].set(bad)} if t == 0 else clean
            if step is None:
                u, s = opt.update(g, s, p)
                p = rmsjax.apply_updates(p, u)
            else:
                p, s = step(p, g, s)
        results[backend] = (np.asarray(p["w"]), jax.tree.map(np.asarray, s))
    got, want = results["native"], results["jax"]
    assert np.isnan(want[0][0]) and np.isnan(got[0][0])
    np.testing.assert_allclose(got[0][1:], want[0][1:], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))


# ---- issue 13: the fallback to pure JAX is visible ---------------------------------------------

_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import jax, jax.numpy as jnp
    from rmsjax import fused, native
    if sys.argv[1] == "unavailable":
        native.available = lambda: False  # as after a failed build (CXX=/bin/false)
    params = {"w": jnp.ones(fused.MIN_NATIVE_SIZE, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    small = {"b": params["b"]}
    caught = {}
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        def run(label, opt, p):
            before = len(log)
            jax.jit(opt.step)(p, p, opt.init(p))
            caught[label] = [str(w.message) for w in log[before:]
                             if issubclass(w.category, fused.NativeFallbackWarning)]
        run("jax", fused.rmsprop(0.1, backend="jax"), params)      # deliberate: no warning
        run("small", fused.rmsprop(0.1), small)                    # ineligible leaves only
        run("first", fused.adam(0.1), params)                      # warns once ...
        run("again", fused.sgd(0.1, momentum=0.9), params)         # ... and only once
    import json; print(json.dumps(caught))
    """
)


@pytest.mark.parametrize("scenario", ["unavailable", "disabled"])
def test_fallback_to_pure_jax_warns_once(scenario):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("RMSJAX_NATIVE", None)
    if scenario == "disabled":
        env["RMSJAX_NATIVE"] = "0"  # deliberate: no warning
    out = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT, scenario],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    caught = json.loads(out.stdout.strip().splitlines()[-1])
    assert caught["jax"] == caught["small"] == caught["again"] == []
    if scenario == "disabled":
        assert caught["first"] == []
    else:
        [message] = caught["first"]
        assert "native CPU kernel is unavailable" in message
        assert "python -m rmsjax.native" in message


def test_gpu_lowering_uses_pure_jax(monkeypatch):
    # In a process that also has an accelerator, the step is lowered per platform; emulate
    # that here and lower for CUDA (no GPU needed to lower).
    monkeypatch.setattr(primitive, "accelerator_present", lambda: True)
    params = mixed()
    opt = fused.rmsprop(0.01, centered=True, momentum=0.9, **SMALL)
    grads = jax.tree.map(jnp.ones_like, params)
    from jax import export  # a submodule: not an attribute of jax before it is imported

    exported = export.export(jax.jit(opt.step), platforms=["cuda"])(params, grads, opt.init(params))
    assert "custom_call @rmsjax_fused_step" not in exported.mlir_module()
    if NATIVE:  # and the same program lowered for CPU does use the kernel
        cpu = jax.jit(opt.step).lower(params, grads, opt.init(params)).as_text()
        assert "custom_call @rmsjax_fused_step" in cpu


def test_step_lowers_per_platform_in_a_cpu_only_process():
    # The kernel's leaves are one primitive, lowered per platform while lowering: the kernel for
    # CPU, the pure-JAX chain for any other platform, with or without an accelerator present;
    # a program exported for both runs the kernel here. Outside jit the step runs eagerly.
    from jax import export  # a submodule: not an attribute of jax before it is imported

    params = mixed()
    opt = fused.rmsprop(0.01, centered=True, momentum=0.9, **SMALL)
    grads = jax.tree.map(jnp.ones_like, params)
    state = opt.init(params)
    cuda = export.export(jax.jit(opt.step), platforms=["cuda"])(params, grads, state)
    assert "custom_call @rmsjax_fused_step" not in cuda.mlir_module()
    if not NATIVE:
        return
    unsafe = [export.DisabledSafetyCheck.custom_call(native.TARGET)]  # the kernel is local
    both = export.export(jax.jit(opt.step), platforms=["cpu", "cuda"], disabled_checks=unsafe)
    exported = both(params, grads, state)
    assert "custom_call @rmsjax_fused_step" in exported.mlir_module()
    ref = fused.rmsprop(0.01, centered=True, momentum=0.9, backend="jax")
    want = jax.jit(ref.step)(params, grads, ref.init(params))
    assert_close(exported.call(params, grads, state), want)
    assert_close(opt.step(params, grads, state), want)


@needs_native
def test_several_devices_fall_back_to_pure_jax():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from rmsjax import fused
        mesh = jax.make_mesh((2,), ("x",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        p = {"w": jax.device_put(jnp.arange(8.0, dtype=jnp.float32), sharding)}
        g = {"w": jax.device_put(jnp.ones(8, jnp.float32), sharding)}
        opt = fused.rmsprop(0.1, momentum=0.9)
        s = opt.init(p)
        assert "ffi_call" not in str(jax.make_jaxpr(opt.step)(p, g, s))
        new_p, _ = jax.jit(opt.step)(p, g, s)
        ref = fused.rmsprop(0.1, momentum=0.9, backend="jax")
        want, _ = jax.jit(ref.step)(p, g, ref.init(p))
        np.testing.assert_allclose(np.asarray(new_p["w"]), np.asarray(want["w"]), rtol=1e-6)
        assert len(new_p["w"].sharding.device_set) == 2
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["centered_momentum", "adamw"])
def test_large_leaves_split_over_threads(name):
    # Above 64K elements the kernel splits the work over threads in 32K-element blocks that
    # cross leaf boundaries; odd sizes check the block edges.
    rng = np.random.default_rng(4)
    f32 = lambda n: jnp.asarray(rng.normal(size=n), jnp.float32)
    params = {"a": f32(300_001), "b": f32(70_003), "c": f32(5)}
    grads = {k: f32(v.size) for k, v in params.items()}
    opt, ref = CONFIGS[name]("auto"), CONFIGS[name]("jax")
    state = opt.init(params)
    for _ in range(2):
        got = jax.jit(opt.step)(params, grads, state)
        want = jax.jit(ref.step)(params, grads, state)
        assert_close(got, want)
        params, state = want


def test_small_leaves_take_the_compiled_rule_by_default():
    opt = fused.rmsprop(0.01, centered=True, momentum=0.9)
    small = {"bias": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)}
    big = {**small, "w": jnp.linspace(-1.0, 1.0, fused.MIN_NATIVE_SIZE, dtype=jnp.float32)}
    assert not uses_kernel(opt, small)
    if NATIVE:
        assert uses_kernel(opt, big)
    assert_close(run_fused(opt, big), run_fused(CONFIGS["centered_momentum"]("jax"), big))


# ---- the build: the shared recipe, setup.py, the installed library, the two instruction sets ----


def _cpu_has_avx2_fma() -> bool:
    """From /proc/cpuinfo (Linux x86-64), independently of the kernel's own CPU check."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to check the CPU flags against")
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    return "avx2" in flags and "fma" in flags


def _cpu_has_avx512_level() -> bool:
    """The AVX-512 subset the kernel's 8-bit loops use, from /proc/cpuinfo (as above)."""
    if not _cpu_has_avx2_fma():
        return False
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vbmi"} <= set(flags)


@pytest.fixture(scope="module")
def built_library(tmp_path_factory) -> Path:
    """The kernel compiled by the shared recipe into a fresh folder (real compiler)."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("recipe") / "fused_step.so"
    assert recipe.compile_kernel(out) == out
    return out


def test_recipe_reports_a_failing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # found on PATH, exits 1 without a word
    with pytest.raises(
        recipe.BuildError,
        match=r"(?s)compiling the native kernel failed .*"
        r"exited with status 1.*the compiler printed nothing",
    ):
        recipe.compile_kernel(tmp_path / "k.so")
    assert list(tmp_path.iterdir()) == []  # neither the library nor its temporary file
    monkeypatch.setenv("CXX", "no-such-compiler-rmsjax --flag")
    with pytest.raises(recipe.BuildError, match=r"no C\+\+ compiler found \(\$CXX="):
        recipe.compile_kernel(tmp_path / "k.so")


def test_recipe_reports_missing_headers(tmp_path):
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    with pytest.raises(recipe.BuildError, match="XLA FFI headers were not found"):
        recipe.compile_kernel(tmp_path / "k.so", include_dir=tmp_path)


def test_recipe_finds_jaxlib_headers_without_importing_jax():
    assert recipe.ffi_include_dir() == Path(jax.ffi.include_dir())
    code = (
        "import sys; sys.path.insert(0, 'rmsjax/_native'); import build; "
        "print(build.ffi_include_dir()); "
        "assert 'jax' not in sys.modules and 'jaxlib' not in sys.modules, sorted(sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(Path(jax.ffi.include_dir()))


def test_recipe_builds_a_loadable_portable_library(built_library):
    mode = built_library.stat().st_mode
    assert mode & stat.S_IROTH and mode & stat.S_IXOTH  # other users can load an installed one
    lib = ctypes.CDLL(str(built_library))
    assert lib.RmsjaxFusedStep  # the FFI handler symbol jax registers
    lib.RmsjaxSourceId.restype = ctypes.c_char_p
    source = (ROOT / "rmsjax" / "_native" / "fused_step.cc").read_bytes()
    expected_id = hashlib.sha256(source + b"\0" + table.cpp_header().encode()).hexdigest()[:16]
    assert lib.RmsjaxSourceId().decode() == expected_id
    lib.RmsjaxKernelIsa.restype = ctypes.c_char_p
    expected = "avx2+fma" if _cpu_has_avx2_fma() else "baseline"
    if _cpu_has_avx512_level():
        expected = "avx512+avx2+fma"
    forced = os.environ.get("RMSJAX_NATIVE_ISA")
    if forced == "baseline" or (forced == "avx2" and expected != "baseline"):
        expected = {"baseline": "baseline", "avx2": "avx2+fma"}[forced]
    assert lib.RmsjaxKernelIsa().decode() == expected
    assert "-march=native" not in recipe.FLAGS


def _setup_py_tree(tmp_path: Path) -> Path:
    """The files setup.py needs, copied (the tests must not write into the checkout)."""
    for rel in (
        "setup.py",
        "pyproject.toml",
        "README.md",
        "rmsjax/__init__.py",
        "rmsjax/_native/__init__.py",
        "rmsjax/_native/build.py",
        "rmsjax/_native/table.py",
        "rmsjax/_native/fused_step.cc",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    # setup.py must not import jax (nor the rmsjax package, which does): poison it.
    (tmp_path / "poison" / "jax").mkdir(parents=True)
    (tmp_path / "poison" / "jax" / "__init__.py").write_text(
        "raise ImportError('setup.py imported jax')\n"
    )
    return tmp_path


@pytest.mark.parametrize("cxx", ["false", "real"])
def test_setup_py_build_ext(tmp_path, cxx):
    # setup.py needs setuptools >= 77 (PEP 639 licence fields; its own bdist_wheel), which the
    # test extra installs.
    pytest.importorskip("setuptools", minversion="77")
    if cxx == "real" and not HAS_CXX:
        pytest.skip("no C++ compiler")
    tree = _setup_py_tree(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tree / "poison"))
    env.pop("CXX", None)
    if cxx == "false":
        env["CXX"] = "false"
    out = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "setup.py imported jax" not in log
    built = sorted((tree / "rmsjax" / "_native").glob("_fused_step*"))
    if cxx == "false":
        assert 'building extension "rmsjax._native._fused_step" failed' in log, log[-3000:]
        assert "compiling the native kernel failed" in log
        assert built == []
    else:
        assert "failed" not in log, log[-3000:]
        # A plain shared library: no interpreter suffix (it has no Python ABI).
        assert [p.name for p in built] == ["_fused_step.so"]
        assert ctypes.CDLL(str(built[0])).RmsjaxFusedStep


_STATUS_SCENARIOS = textwrap.dedent(
    """
    import json, os, shutil, sys
    from pathlib import Path
    from rmsjax import native
    from rmsjax._native import loader

    real, stale, newer, work = (Path(a) for a in sys.argv[1:5])
    loader.build = lambda **kw: real  # the first-use build: the library compiled by the test
    name = "_fused_step.so"  # as setup.py names it
    results = {}
    for scenario in sys.argv[5:]:
        folder = work / scenario
        folder.mkdir()
        if scenario in ("installed", "disabled"):
            shutil.copy2(real, folder / name)
        elif scenario in ("stale", "newer_ffi"):
            shutil.copy2(stale if scenario == "stale" else newer, folder / name)
        elif scenario == "broken":
            (folder / name).write_bytes(b"not a shared library")
        native.reset(folder)
        if scenario == "disabled":
            os.environ["RMSJAX_NATIVE"] = "0"
        results[scenario] = [str(folder / name), native.status()]
    import jax.numpy as jnp
    assert float(jnp.ones(3).sum()) == 3.0  # JAX still works after every scenario
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def statuses(built_library, tmp_path_factory) -> dict:
    """native.status() with one compiled against the FFI headers of a newer jaxlib (first,
    before anything has started JAX's CPU backend), none, a stale library (built from another
    source) and a broken one next to the module, in one fresh process; with an installed library
    and with RMSJAX_NATIVE=0 in another (XLA takes one library per target and process). The
    first-use build is stubbed to return ``built_library``."""
    work = tmp_path_factory.mktemp("status")
    # This kernel, compiled against this jaxlib's FFI headers with the API's minor version one
    # higher: what a wheel built against a newer jaxlib holds. XLA refuses to register it.
    headers = work / "newer-include"
    shutil.copytree(recipe.ffi_include_dir(), headers)
    c_api = headers / "xla" / "ffi" / "api" / "c_api.h"
    minor = re.search(r"#define XLA_FFI_API_MINOR (\d+)", c_api.read_text())
    assert minor is not None, "c_api.h no longer defines XLA_FFI_API_MINOR"
    c_api.write_text(
        c_api.read_text().replace(minor.group(0), f"#define XLA_FFI_API_MINOR {int(minor[1]) + 1}")
    )
    newer = recipe.compile_kernel(work / "newer.so", include_dir=headers)
    stale_src = work / "stale.cc"
    stale_src.write_text(
        'extern "C" const char* RmsjaxSourceId() { return "0123456789abcdef"; }\n'
        'extern "C" void* RmsjaxFusedStep() { return nullptr; }\n'
    )
    stale = work / "stale.so"
    cxx = recipe.find_compiler()
    subprocess.run([*cxx, "-shared", "-fPIC", str(stale_src), "-o", str(stale)], check=True)
    env = dict(os.environ)
    env.pop("RMSJAX_NATIVE", None)
    results = {}
    for scenarios in (["newer_ffi", "none", "stale", "broken"], ["installed", "disabled"]):
        libraries = map(str, (built_library, stale, newer, work))
        out = subprocess.run(
            [sys.executable, "-c", _STATUS_SCENARIOS, *libraries, *scenarios],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def test_status_names_the_installed_library(statuses):
    path, status = statuses["installed"]
    assert status.startswith(f"native (installed): {path} [")
    assert status.endswith(" kernels]")


def test_status_without_an_installed_library_names_the_first_use_build(statuses, built_library):
    _, status = statuses["none"]
    assert status.startswith(f"native (built on first use): {built_library} [")
    assert "installed" not in status


@pytest.mark.parametrize(
    "scenario, why",
    [
        ("stale", "RuntimeError: it was built from a different fused_step.cc"),
        ("broken", "OSError"),
    ],
)
def test_status_falls_back_when_the_installed_library_is_unusable(
    statuses, built_library, scenario, why
):
    path, status = statuses[scenario]
    assert status.startswith(f"native (built on first use): {built_library} [")
    assert f"the installed {path} was not used: {why}" in status


def test_library_for_a_newer_jaxlib_is_refused_without_breaking_jax(statuses, built_library):
    # The scenario runs first in its process, before anything has started JAX's CPU backend:
    # the refused handler must not stay queued and fail the backend's start-up (the scenario
    # script checks that JAX still computes at the end).
    path, status = statuses["newer_ffi"]
    assert status.startswith(f"native (built on first use): {built_library} [")
    assert re.search(rf"the installed {re.escape(path)} was not used: \w+: .*API version", status)


def test_status_when_disabled(statuses):
    assert statuses["disabled"][1] == "pure-JAX only: disabled by RMSJAX_NATIVE=0"


@needs_native
def test_baseline_kernels_match_pure_jax_on_a_cpu_without_fma():
    # The kernel's baseline loops (used on x86-64 CPUs without AVX2+FMA) never run on a CPU that
    # has them unless asked to; run them, with XLA limited to AVX (no FMA) as it would be on
    # such a CPU, and check every configuration against the pure-JAX path.
    if not _cpu_has_avx2_fma():
        pytest.skip("the baseline loops are the ones in use here; the other tests cover them")
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from rmsjax import fused, native
        import tests.test_native as t
        assert "[baseline kernels]" in native.status(), native.status()
        rng = np.random.default_rng(5)
        # small leaves of every shape, and one above the 64K-element threading threshold
        params = {**t.mixed(), "big": jax.numpy.asarray(rng.normal(size=100_003), "float32")}
        for name in sorted(t.CONFIGS):
            opt, ref = t.CONFIGS[name]("auto"), t.CONFIGS[name]("jax")
            assert t.uses_kernel(opt, params), name
            t.assert_close(t.run_fused(opt, params), t.run_fused(ref, params))
        # and the special-value differential check on a spread of configurations
        import tests.test_fused_differential as d
        for name, items in d.CONFIGS[::5] + d.CONFIGS[-2:]:
            d.check_example(name, items, hp_index=len(name), seed=7, p_special=0.3)
        print("ok")
        """
    )
    env = dict(os.environ, RMSJAX_NATIVE_ISA="baseline", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX").strip()
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
