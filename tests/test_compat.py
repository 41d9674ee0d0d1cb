"""Framework presets against trajectories of the real frameworks.

``tests/reference/*.npz`` hold parameter trajectories of ``torch.optim``, ``keras.optimizers``
and a NumPy statement of TF1's RMSProp kernels, with the gradients that were fed; they are
written by ``tests/reference/generate.py`` (needs torch and keras, which these tests do not).
Each preset is fed the same gradients and must walk the same trajectory: float64 (and
complex128) to 1e-12 of the parameter scale, float32 (and complex64) to 2e-6 of it.

float64 runs switch on jax's x64 mode only inside ``enable_x64(True)`` blocks (from
tests.common), so nothing leaks into other test files.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
import rmsjax as V
import rmsjax.compat.bitsandbytes
import rmsjax.compat.keras
import rmsjax.compat.pytorch
import rmsjax.compat.tf1
import rmsjax.compat.torchao
from rmsjax import fused, native
from tests.common import enable_x64

REF = Path(__file__).parent / "reference"
MODULES = {
    "torch": rmsjax.compat.pytorch,
    "keras": rmsjax.compat.keras,
    "tf1": rmsjax.compat.tf1,
}
WIDE = ("float64", "complex128")


def presets_of(module: Any) -> tuple[str, ...]:
    """The optimizer factories of a compat module (``compat.keras`` exports helpers too)."""
    return tuple(getattr(module, "PRESETS", module.__all__))


TOL = {"x64": 1e-12, "x32": 2e-6}


@cache
def load(framework: str) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    with np.load(REF / f"{framework}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays.pop("versions", None)
    return json.loads(str(arrays.pop("cases"))), arrays


@cache
def framework_signatures(framework: str) -> dict[str, list[list[Any]]]:
    with np.load(REF / f"{framework}.npz") as z:
        return json.loads(str(z["signatures"]))


def schedule(spec: dict[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """The jax form of a schedule stored by the generator (count 0, 1, 2, ...)."""
    if spec["kind"] == "exponential":
        return lambda count: spec["init"] * spec["gamma"] ** count
    boundaries, values = spec["boundaries"], spec["values"]

    def piecewise(count: jax.Array) -> jax.Array:
        out = jnp.asarray(values[-1])
        for boundary, value in reversed(list(zip(boundaries, values, strict=False))):
            out = jnp.where(count <= boundary, value, out)
        return out

    return piecewise


def preset_kwargs(framework: str, preset: str, kwargs: dict[str, Any], mode: str) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if framework == "keras" and "learning_rate" not in kwargs:
        signature = inspect.signature(getattr(MODULES[framework], preset))
        kwargs["learning_rate"] = signature.parameters["learning_rate"].default
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, dict):
            value = schedule(value["schedule"])
        elif isinstance(value, list):
            value = tuple(value)
        elif framework == "keras" and name == "learning_rate" and mode == "x64":
            # Keras keeps the learning rate in a float32 variable, also for float64 weights:
            # give rmsjax the value Keras actually used.
            value = float(np.float32(value))
        out[name] = value
    return out


@contextmanager
def precision(mode: str) -> Iterator[None]:
    with enable_x64(mode == "x64"):
        yield


def replay(
    opts: list[Any],
    starts: list[Any],
    grads: list[Any],
    readout: Callable[[Any, Any], Any] | None = None,
    *,
    fused_step: bool = False,
) -> tuple[list[Any], list[Any]]:
    """Feed each optimizer its stored gradients; return the parameters after each step, and
    ``readout(params, state)`` after each step (None without a readout). ``fused_step``: step
    with ``opt.step`` (a :class:`rmsjax.fused.FusedOptimizer`) instead of ``update`` +
    ``apply_updates``.

    All optimizers run side by side in ONE jitted scan (one compilation per framework and
    precision instead of one per case keeps this file fast).
    """

    def step(carry: list[Any], gs: list[Any]) -> tuple[list[Any], Any]:
        new = []
        for opt, (p, s), g in zip(opts, carry, gs, strict=True):
            if fused_step:
                new.append(opt.step(p, g, s))
                continue
            u, s = opt.update(g, s, p)
            new.append((rmsjax.apply_updates(p, u), s))
        read = [readout(p, s) for p, s in new] if readout else None
        return new, ([p for p, _ in new], read)

    @jax.jit
    def run(p0s: list[Any], gs: list[Any]) -> Any:
        init = [(p, opt.init(p)) for opt, p in zip(opts, p0s, strict=True)]
        return jax.lax.scan(step, init, gs)[1]

    params, read = run(starts, grads)
    return params, read if readout else [None] * len(opts)


def runs_of(case: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in case["runs"] if (r["dtype"] in WIDE) == (mode == "x64")]


# Options under which an update depends on whole leaves, not entry by entry.
NOT_ELEMENTWISE = {"clipnorm", "global_clipnorm"}


def units_of(case: dict[str, Any], mode: str) -> list[dict[str, list[str]]]:
    """The replay units of a case: ``{dtype: run keys}`` trees given to one optimizer.

    An elementwise preset takes all runs of one dtype stacked into one leaf; a case with named
    leaves or a norm clipping gets one unit per run (a norm must not mix runs).
    """
    by_dtype: dict[str, list[str]] = {}
    for r in runs_of(case, mode):
        by_dtype.setdefault(r["dtype"], []).append(r["key"])
    if "leaves" in case or NOT_ELEMENTWISE & set(case["kwargs"]):
        return [{d: [k]} for d, keys in by_dtype.items() for k in keys]
    return [by_dtype]


def split_leaves(case: dict[str, Any], x: Any) -> Any:
    """``x[..., 6]`` as the case's tree: itself, or ``{name: x[..., slice]}`` for "leaves"."""
    if "leaves" not in case:
        return x
    out, start = {}, 0
    for name, size in case["leaves"]:
        out[name] = x[..., start : start + size]
        start += size
    return out


def join_leaves(case: dict[str, Any], tree: Any) -> np.ndarray:
    if "leaves" not in case:
        return np.asarray(tree)
    return np.concatenate([np.asarray(tree[name]) for name, _ in case["leaves"]], axis=-1)


def scaled_errors(
    framework: str,
    mode: str,
    items: list[tuple[dict[str, Any], Any]],
    readout: Callable[[Any, Any], Any] | None = None,
    *,
    fused_step: bool = False,
) -> list[dict[str, float]]:
    """For each (case, optimizer): max |rmsjax - reference| / max |reference| per run.

    With a ``readout``, runs that stored ``<key>/ema`` are also compared on
    ``readout(params, state)`` (reported as ``<key>/ema``).
    """
    _, arrays = load(framework)
    units, opts, starts, grads = [], [], [], []
    for i, (case, opt) in enumerate(items):
        for unit in units_of(case, mode):
            units.append((i, case, unit))
            opts.append(opt)
            starts.append(
                {
                    d: split_leaves(
                        case, jnp.asarray(np.stack([arrays[f"{k}/params"][0] for k in ks]))
                    )
                    for d, ks in unit.items()
                }
            )
            grads.append(
                {
                    d: split_leaves(
                        case, jnp.asarray(np.stack([arrays[f"{k}/grads"] for k in ks], axis=1))
                    )
                    for d, ks in unit.items()
                }
            )
    got, read = replay(opts, starts, grads, readout, fused_step=fused_step)
    out: list[dict[str, float]] = [{} for _ in items]
    for (i, case, unit), traj, extra in zip(units, got, read, strict=True):
        for d, keys in unit.items():
            values = join_leaves(case, traj[d])
            assert str(values.dtype) == d
            for j, k in enumerate(keys):
                ref = arrays[f"{k}/params"]
                out[i][k] = float(np.abs(values[:, j] - ref[1:]).max() / np.abs(ref).max())
                if extra is not None and f"{k}/ema" in arrays:
                    ema = join_leaves(case, extra[d])[:, j]
                    ref_ema = arrays[f"{k}/ema"]
                    out[i][f"{k}/ema"] = float(np.abs(ema - ref_ema).max() / np.abs(ref).max())
    return out


@cache
def preset_errors(framework: str, mode: str) -> dict[str, dict[str, float]]:
    """Errors of every preset case of one framework in one precision (computed once)."""
    cases, _ = load(framework)
    cases = [c for c in cases if runs_of(c, mode)]
    with precision(mode):
        items = []
        for case in cases:
            factory = getattr(MODULES[framework], case["preset"])
            items.append(
                (case, factory(**preset_kwargs(framework, case["preset"], case["kwargs"], mode)))
            )
        readout = getattr(MODULES[framework], "finalize_variable_values", None)
        errors = scaled_errors(framework, mode, items, readout)
    return {c["name"]: e for c, e in zip(cases, errors, strict=True)}


def all_cases() -> Iterator[Any]:
    for framework in MODULES:
        cases, _ = load(framework)
        for case in cases:
            for mode in ("x64", "x32"):
                if runs_of(case, mode):
                    yield pytest.param(
                        framework, case, mode, id=f"{framework}-{case['name']}-{mode}"
                    )


@pytest.mark.parametrize(("framework", "case", "mode"), list(all_cases()))
def test_preset_matches_framework(framework: str, case: dict[str, Any], mode: str) -> None:
    errors = preset_errors(framework, mode)[case["name"]]
    bad = {k: v for k, v in errors.items() if not v <= TOL[mode]}
    assert not bad, f"beyond {TOL[mode]:g} of the parameter scale: {bad}"


# The float32 stored cases whose fused step does NOT run the kernel, with the reason (the rest of
# every preset in FUSED_PRESETS must run it): AMSGrad keeps a third moment the kernel has no slot
# for; Keras' clipping, gradient accumulation and EMA are transformations between or around the
# rules (the chain's updates change between its stages); PyTorch's SGD with momentum keeps its
# own dampened buffer (dampened_trace, a rule the kernel does not have).
FUSED_PRESETS = {
    "torch": {"rmsprop", "adam", "adamw", "sgd"},
    "keras": {"rmsprop", "adam", "adamw", "sgd"},
    "tf1": {"rmsprop"},
}
NOT_FUSED = {
    "torch": {
        "adam_all_flags": "amsgrad",
        "adam_amsgrad": "amsgrad",
        "adamw_all_flags": "amsgrad",
        "sgd_all_flags": "dampened momentum",
        "sgd_nesterov": "dampened momentum",
        "sgd_schedule": "dampened momentum",
    },
    "keras": {
        "adam_all_flags": "amsgrad",
        "adamw_all_flags": "amsgrad",
        "sgd_clipnorm": "clipping",
        "sgd_global_clipnorm": "clipping",
        "adam_global_clipnorm_ema": "clipping, EMA",
        "rmsprop_ema_overwrite": "EMA",
        "adam_accumulate_schedule": "accumulation",
        "sgd_accumulate_weight_decay": "accumulation",
        "adamw_clipvalue_accumulate_ema": "clipping, accumulation, EMA",
        "rmsprop_every_option": "clipping, accumulation, EMA",
    },
    "tf1": {},
}


@cache
def fused_preset_errors(framework: str) -> tuple[dict[str, dict[str, float]], set[str]]:
    """Errors of every float32 preset case run through ``rmsjax.fused.fused(preset).step``,
    and the cases whose step runs the kernel."""
    mode = "x32"
    cases = [c for c in load(framework)[0] if runs_of(c, mode)]
    items, kernel = [], set()
    for case in cases:
        factory = getattr(MODULES[framework], case["preset"])
        opt = fused.fused(
            factory(**preset_kwargs(framework, case["preset"], case["kwargs"], mode)),
            min_native_size=0,
        )
        items.append((case, opt))
        params = split_leaves(case, jnp.zeros((2, 6), jnp.float32))
        jaxpr = jax.make_jaxpr(opt.step)(params, params, opt.init(params))
        if "ffi_call" in str(jaxpr):
            kernel.add(case["name"])
    if not native.available():
        kernel = set()
    errors = scaled_errors(framework, mode, items, fused_step=True)
    return {c["name"]: e for c, e in zip(cases, errors, strict=True)}, kernel


@pytest.mark.parametrize("framework", sorted(FUSED_PRESETS))
def test_fused_presets_match_the_framework_like_the_pure_ones(framework: str) -> None:
    errors, kernel = fused_preset_errors(framework)
    for name, e in errors.items():
        bad = {k: v for k, v in e.items() if not v <= TOL["x32"]}
        assert not bad, f"{name}: beyond {TOL['x32']:g} of the parameter scale: {bad}"
    if not native.available():
        pytest.skip(f"native kernel off ({native.status()}): the fused steps ran pure JAX")
    presets = {c["name"]: c["preset"] for c in load(framework)[0] if runs_of(c, "x32")}
    want = {n for n, p in presets.items() if p in FUSED_PRESETS[framework]} - set(
        NOT_FUSED[framework]
    )
    assert kernel == want, (sorted(kernel - want), sorted(want - kernel))


def test_references_cover_the_issue() -> None:
    """Every preset, >= 25 steps, float32/float64, complex64 for torch, tiny gradients, and
    float32 runs that move far more than the tolerance (so each comparison can fail)."""
    for framework, module in MODULES.items():
        cases, arrays = load(framework)
        presets = {c["preset"] for c in cases}
        assert presets == set(presets_of(module)), framework
        runs = [r for c in cases for r in c["runs"]]
        dtypes = {r["dtype"] for r in runs}
        assert {"float32", "float64"} <= dtypes
        if framework == "torch":
            assert "complex64" in dtypes
        assert {1e-6, 1e-8} <= {r["scale"] for r in runs}
        for r in runs:
            params = arrays[f"{r['key']}/params"]
            assert params.shape[0] - 1 >= 25
            assert str(params.dtype) == r["dtype"]
            if r["dtype"] not in WIDE:
                moved = np.abs(params[-1] - params[0]).max() / np.abs(params).max()
                assert moved > 10 * TOL["x32"], r["key"]
    total = sum((REF / f"{fw}.npz").stat().st_size for fw in MODULES)
    assert total < 2_000_000


# Keras' BaseOptimizer arguments, each of which some stored Keras case sets.
KERAS_BASE_OPTIONS = {
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
    "exclude_from_weight_decay",
}


def test_keras_references_cover_every_base_option() -> None:
    """Each option in a stored case, per-leaf clipping on several leaves, accumulation with a
    schedule, and the moving average stored for every ``use_ema`` run (so it is compared)."""
    cases, arrays = load("keras")
    used = {name for c in cases for name in c["kwargs"]}
    assert KERAS_BASE_OPTIONS <= used
    for option in ("clipnorm", "global_clipnorm", "exclude_from_weight_decay"):
        assert any(option in c["kwargs"] and len(c.get("leaves", [])) >= 2 for c in cases)
    for c in cases:
        for r in c["runs"]:
            assert (f"{r['key']}/ema" in arrays) == bool(c["kwargs"].get("use_ema")), r["key"]
    assert any(
        "gradient_accumulation_steps" in c["kwargs"]
        and isinstance(c["kwargs"]["learning_rate"], dict)
        for c in cases
    )


# --------------------------------------------------------------------------------------------
# Each convention matters: the "other framework's" choice misses the stored trajectory.
# These back the claims of docs/conventions.md.
# --------------------------------------------------------------------------------------------


def _case(framework: str, name: str) -> dict[str, Any]:
    return next(c for c in load(framework)[0] if c["name"] == name)


CONTRASTS = {
    # torch RMSprop: eps outside the root; eps inside misses with tiny gradients.
    "torch_rmsprop_eps_outside": (
        "torch",
        "rmsprop_tiny",
        "x32",
        lambda: rmsjax.rmsprop(0.01, decay=0.9, eps=1e-8, eps_in_sqrt=True),
    ),
    # Keras RMSprop: eps inside; eps outside misses.
    "keras_rmsprop_eps_inside": (
        "keras",
        "rmsprop_tiny",
        "x32",
        lambda: rmsjax.rmsprop(1.0, decay=0.9, eps=1e-7, eps_in_sqrt=False),
    ),
    # torch RMSprop: lr outside the momentum buffer; lr inside misses under a schedule.
    "torch_rmsprop_lr_outside_buffer": (
        "torch",
        "rmsprop_schedule",
        "x64",
        lambda: rmsjax.rmsprop(
            schedule({"kind": "exponential", "init": 0.05, "gamma": 0.85}),
            decay=0.99,
            eps=1e-8,
            eps_in_sqrt=False,
            centered=True,
            momentum=0.9,
        ),
    ),
    # Keras RMSprop: lr inside the buffer; lr outside misses under a schedule.
    "keras_rmsprop_lr_inside_buffer": (
        "keras",
        "rmsprop_schedule",
        "x64",
        lambda: optax.chain(
            rmsjax.scale_by_rms(decay=0.9, eps=1e-7),
            rmsjax.trace(decay=0.9),
            rmsjax.scale_by_learning_rate(
                schedule(
                    {"kind": "piecewise", "boundaries": [9, 19], "values": [2**-5, 2**-7, 2**-9]}
                )
            ),
        ),
    ),
    # TF1: the mean square starts at one; starting at zero misses.
    "tf1_ms_starts_at_one": (
        "tf1",
        "rmsprop_defaults",
        "x64",
        lambda: rmsjax.rmsprop(0.01, decay=0.9, eps=1e-10, initial_scale=0.0),
    ),
    # torch SGD: first step copies g undamped; dampening from the first step misses.
    "torch_sgd_first_step_undamped": (
        "torch",
        "sgd_all_flags",
        "x64",
        lambda: optax.chain(
            rmsjax.scale(-1.0),
            rmsjax.add_decayed_weights(0.1),
            rmsjax.scale(0.7),  # (1 - dampening) g on every step, first included
            rmsjax.trace(decay=0.9),
            rmsjax.scale_by_learning_rate(0.05),
        ),
    ),
    # torch AMSGrad: max over the raw second moment; optax's corrected max misses.
    "torch_amsgrad_raw_max": (
        "torch",
        "adam_amsgrad",
        "x64",
        lambda: optax.chain(
            V.scale_by_amsgrad(max_before_correction=False), rmsjax.scale_by_learning_rate(0.1)
        ),
    ),
    # Keras Adam: epsilon hat; torch's eps placement misses with tiny gradients.
    "keras_adam_eps_hat": (
        "keras",
        "adam_tiny",
        "x32",
        lambda: optax.chain(rmsjax.scale_by_adam(eps=1e-7), rmsjax.scale_by_learning_rate(0.1)),
    ),
    # torch complex: per-component moments; optax's |g|^2 moments miss.
    "torch_complex_per_component": (
        "torch",
        "rmsprop_defaults",
        "x32",
        lambda: rmsjax.rmsprop(0.01, decay=0.99, eps=1e-8, eps_in_sqrt=False),
    ),
    # Keras weight decay: decoupled, lr-scaled; coupled (torch-style L2) misses.
    "keras_weight_decay_decoupled": (
        "keras",
        "rmsprop_all_flags",
        "x64",
        lambda: optax.chain(
            rmsjax.add_decayed_weights(0.1),
            rmsjax.scale_by_centered_rms(decay=0.9, eps=1e-7),
            rmsjax.scale_by_learning_rate(float(np.float32(0.01))),
            rmsjax.trace(decay=0.9),
        ),
    ),
    # torch AdamW: decoupled; torch Adam's coupled weight decay misses.
    "torch_adamw_decoupled": (
        "torch",
        "adamw_schedule",
        "x64",
        lambda: rmsjax.compat.pytorch.adam(
            lr=schedule({"kind": "exponential", "init": 0.1, "gamma": 0.9}), weight_decay=0.5
        ),
    ),
    # torch: maximize negates the raw gradient BEFORE the coupled weight decay.
    "torch_maximize_before_weight_decay": (
        "torch",
        "rmsprop_all_flags",
        "x64",
        lambda: optax.chain(
            rmsjax.add_decayed_weights(0.1),
            rmsjax.scale(-1.0),
            V.split_real_and_imaginary(rmsjax.scale_by_centered_rms(0.99, 1e-8, eps_in_sqrt=False)),
            rmsjax.trace(decay=0.9),
            rmsjax.scale_by_learning_rate(0.01),
        ),
    ),
    # torch Adagrad: lr / (1 + (t - 1) lr_decay); ignoring lr_decay misses.
    "torch_adagrad_lr_decay": (
        "torch",
        "adagrad_all_flags",
        "x64",
        lambda: rmsjax.compat.pytorch.adagrad(
            lr=0.1, weight_decay=0.1, initial_accumulator_value=0.5, maximize=True
        ),
    ),
    # torch Rprop: each step uses the current gradient; optax's rprop emits it one call late.
    # (split so that optax's rprop, which fails on complex leaves, sees real ones only)
    "torch_rprop_not_delayed": (
        "torch",
        "rprop_defaults",
        "x64",
        lambda: V.split_real_and_imaginary(optax.rprop(0.01)),
    ),
    # Keras clipnorm clips each variable on its own; clipping the global norm misses.
    "keras_clipnorm_per_variable": (
        "keras",
        "sgd_clipnorm",
        "x64",
        lambda: rmsjax.compat.keras.sgd(
            learning_rate=float(np.float32(0.1)), momentum=0.9, global_clipnorm=0.5
        ),
    ),
    # Keras accumulation: the schedule sees the call count; optax.MultiSteps (update count)
    # misses.
    "keras_accumulation_schedule_at_call_count": (
        "keras",
        "adam_accumulate_schedule",
        "x64",
        lambda: optax.MultiSteps(
            rmsjax.compat.keras.adam(
                schedule(
                    {"kind": "piecewise", "boundaries": [9, 19], "values": [2**-5, 2**-7, 2**-9]}
                )
            ),
            every_k_schedule=3,
        ).gradient_transformation(),
    ),
    # Keras ema_overwrite_frequency replaces the parameters by their average; without it the
    # trajectory misses.
    "keras_ema_overwrites_parameters": (
        "keras",
        "rmsprop_ema_overwrite",
        "x64",
        lambda: rmsjax.compat.keras.rmsprop(
            learning_rate=float(np.float32(0.01)), momentum=0.9, use_ema=True, ema_momentum=0.8
        ),
    ),
    # torch Adagrad: eps outside the root; inside misses with tiny gradients.
    "torch_adagrad_eps_outside": (
        "torch",
        "adagrad_tiny",
        "x32",
        lambda: rmsjax.compat.keras.adagrad(
            learning_rate=0.05, initial_accumulator_value=0.0, epsilon=1e-10
        ),
    ),
}


@cache
def contrast_errors(framework: str, mode: str) -> dict[str, dict[str, float]]:
    """Errors of every contrast of one framework in one precision (one compilation)."""
    claims = [c for c, (fw, _, m, _) in CONTRASTS.items() if (fw, m) == (framework, mode)]
    with precision(mode):
        items = [(_case(framework, CONTRASTS[c][1]), CONTRASTS[c][3]()) for c in claims]
        errors = scaled_errors(framework, mode, items)
    return dict(zip(claims, errors, strict=True))


@pytest.mark.parametrize("claim", sorted(CONTRASTS))
def test_other_convention_misses_reference(claim: str) -> None:
    framework, _, mode, _ = CONTRASTS[claim]
    errors = contrast_errors(framework, mode)[claim]
    assert max(errors.values()) > 100 * TOL[mode], errors


# --------------------------------------------------------------------------------------------
# Validation and tracing
# --------------------------------------------------------------------------------------------

P, K, F = rmsjax.compat.pytorch, rmsjax.compat.keras, rmsjax.compat.tf1


@pytest.mark.parametrize(
    ("factory", "kwargs", "names"),
    [
        (P.rmsprop, {"lr": -1.0}, "`lr`"),
        (P.rmsprop, {"eps": -1e-8}, "`eps`"),
        (P.rmsprop, {"momentum": -0.1}, "`momentum`"),
        (P.rmsprop, {"weight_decay": -0.1}, "`weight_decay`"),
        (P.rmsprop, {"alpha": -0.5}, "`alpha`"),
        (P.adam, {"lr": -1e-3}, "`lr`"),
        (P.adam, {"betas": (1.0, 0.999)}, "`betas[0]`"),
        (P.adam, {"betas": (0.9, -0.1)}, "`betas[1]`"),
        (P.adam, {"eps": -1.0}, "`eps`"),
        (P.adamw, {"weight_decay": -1.0}, "`weight_decay`"),
        (P.sgd, {"lr": -0.1}, "`lr`"),
        (P.sgd, {"nesterov": True}, "Nesterov"),
        (P.sgd, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "Nesterov"),
        (P.sgd, {"momentum": -0.9}, "`momentum`"),
        (P.adagrad, {"lr_decay": -1.0}, "`lr_decay`"),
        (P.adagrad, {"initial_accumulator_value": -1.0}, "`initial_accumulator_value`"),
        (P.adagrad, {"eps": -1.0}, "`eps`"),
        (P.adadelta, {"rho": 1.5}, "`rho`"),
        (P.adadelta, {"lr": -1.0}, "`lr`"),
        (P.rprop, {"etas": (1.5, 1.2)}, "`etas[0]`"),
        (P.rprop, {"etas": (0.5, 0.9)}, "`etas[1]`"),
        (P.rprop, {"step_sizes": (1.0, 0.5)}, "step_sizes"),
        (K.rmsprop, {"rho": 1.0}, "`rho`"),
        (K.rmsprop, {"learning_rate": -1.0}, "`learning_rate`"),
        (K.adam, {"beta_1": 1.0}, "`beta_1`"),
        (K.adamw, {"weight_decay": None}, "`weight_decay`"),
        (K.sgd, {"momentum": 1.5}, "`momentum`"),
        (K.adagrad, {"initial_accumulator_value": -0.1}, "`initial_accumulator_value`"),
        (K.adadelta, {"epsilon": -1.0}, "`epsilon`"),
        (K.sgd, {"clipnorm": 1.0, "global_clipnorm": 1.0}, "Only one of `clipnorm`"),
        (K.rmsprop, {"clipvalue": 1.0, "global_clipnorm": 1.0}, "Only one of `clipnorm`"),
        (F.rmsprop, {"learning_rate": -1.0}, "`learning_rate`"),
        (F.rmsprop, {"learning_rate": 0.1, "decay": 1.0}, "`decay`"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(
    factory: Callable[..., Any], kwargs: dict[str, Any], names: str
) -> None:
    with pytest.raises(ValueError, match=names.replace("[", r"\[").replace("]", r"\]")):
        factory(**kwargs)


# Every pair argument of every preset, with the form its documentation gives.
B, A = rmsjax.compat.bitsandbytes, rmsjax.compat.torchao
PAIRS = [
    (P.adam, "betas", "(beta1, beta2)"),
    (P.adamw, "betas", "(beta1, beta2)"),
    (P.rprop, "etas", "(eta_minus, eta_plus)"),
    (P.rprop, "step_sizes", "(min, max)"),
    (B.adam8bit, "betas", "(beta1, beta2)"),
    (B.adamw8bit, "betas", "(beta1, beta2)"),
    (A.adamw8bit, "betas", "(beta1, beta2)"),
    (A.adamw4bit, "betas", "(beta1, beta2)"),
]
PAIR_IDS = [f"{f.__module__.split('.')[2]}.{f.__name__}-{name}" for f, name, _ in PAIRS]


def test_pairs_cover_every_pair_argument() -> None:
    """Every preset argument whose default is a pair is in PAIRS, so a new one gets tested."""
    found = set()
    for module in (P, K, F, B, A):
        for preset in presets_of(module):
            factory = getattr(module, preset)
            for p in inspect.signature(factory).parameters.values():
                if isinstance(p.default, tuple):
                    found.add((factory, p.name))
    assert found == {(f, name) for f, name, _ in PAIRS}


@pytest.mark.parametrize("value", [0.9, None, "ab", jnp.asarray(0.9)], ids=repr)
@pytest.mark.parametrize(("preset", "name", "form"), PAIRS, ids=PAIR_IDS)
def test_a_pair_argument_given_no_sequence_is_a_type_error(
    preset: Callable[..., Any], name: str, form: str, value: Any
) -> None:
    with pytest.raises(TypeError) as info:
        preset(**{name: value})
    assert str(info.value).startswith(f"`{name}` must be a pair {form}, got {value!r} of type")


@pytest.mark.parametrize(
    ("value", "shown"),
    [((0.5,), "(0.5,)"), ([0.5, 2.0, 3.0], "[0.5, 2.0, 3.0]"), (np.ones((2, 2)), "shape (2, 2)")],
    ids=["one", "three", "matrix"],
)
@pytest.mark.parametrize(("preset", "name", "form"), PAIRS, ids=PAIR_IDS)
def test_a_pair_argument_of_another_length_is_a_value_error(
    preset: Callable[..., Any], name: str, form: str, value: Any, shown: str
) -> None:
    with pytest.raises(ValueError) as info:
        preset(**{name: value})
    message = str(info.value)
    assert message.startswith(f"`{name}` must be a pair {form}, got ") and shown in message


@pytest.mark.parametrize(("preset", "name", "form"), PAIRS, ids=PAIR_IDS)
def test_a_pair_argument_may_be_a_list_or_an_array(
    preset: Callable[..., Any], name: str, form: str
) -> None:
    default = inspect.signature(preset).parameters[name].default
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    grads = {"w": jnp.cos(jnp.arange(5.0))}

    def step(value: Any) -> Any:
        opt = preset(**{name: value})
        return opt.update(grads, opt.init(params), params)[0]["w"]

    expected = step(default)
    for value in (list(default), np.asarray(default)):
        np.testing.assert_array_equal(step(value), expected)


# A value outside the range of each numeric argument of the Keras and TF1 presets.
BAD_VALUES = {
    "learning_rate": -1.0,
    "rho": 1.0,
    "decay": 1.0,
    "momentum": 1.5,
    "epsilon": -1.0,
    "beta_1": 1.0,
    "beta_2": -0.1,
    "initial_accumulator_value": -0.1,
    "weight_decay": -0.1,
    "clipnorm": -1.0,
    "clipvalue": 0.0,
    "global_clipnorm": -1.0,
    "ema_momentum": 1.5,
    "ema_overwrite_frequency": 0,
    "loss_scale_factor": 0.0,
    "gradient_accumulation_steps": 1,
}
NOT_NUMERIC = {"centered", "amsgrad", "nesterov", "use_ema", "name", "exclude_from_weight_decay"}


def numeric_arguments() -> Iterator[Any]:
    for module in (K, F):
        for preset in presets_of(module):
            for p in inspect.signature(getattr(module, preset)).parameters.values():
                if p.name not in NOT_NUMERIC:
                    yield pytest.param(
                        module, preset, p.name, id=f"{module.__name__}.{preset}-{p.name}"
                    )


@pytest.mark.parametrize(("module", "preset", "argument"), list(numeric_arguments()))
def test_bad_value_is_reported_with_the_frameworks_name(
    module: Any, preset: str, argument: str
) -> None:
    """Every numeric argument of every Keras / TF1 preset: a bad value raises at construction,
    and the message starts with the framework's name for it (not rmsjax's, e.g. `eps`)."""
    kwargs = {"learning_rate": 0.1} if module is F else {}
    if argument.startswith("ema_"):
        kwargs["use_ema"] = True  # Keras checks the EMA arguments only when it is on
    kwargs[argument] = BAD_VALUES[argument]
    with pytest.raises(ValueError, match=f"^`{argument}` must be"):
        getattr(module, preset)(**kwargs)


def test_keras_static_arguments_need_python_ints() -> None:
    with pytest.raises(TypeError, match="`gradient_accumulation_steps` must be None or a Python"):
        K.sgd(gradient_accumulation_steps=2.0)
    with pytest.raises(TypeError, match=r"`ema_overwrite_frequency`.*static_args"):
        optax.inject_hyperparams(K.sgd)(use_ema=True, ema_overwrite_frequency=3).init(jnp.zeros(2))
    with pytest.raises(TypeError, match="`exclude_from_weight_decay`"):
        K.adamw(exclude_from_weight_decay=[1])
    opt = optax.inject_hyperparams(K.sgd, static_args="gradient_accumulation_steps")(
        learning_rate=0.1, gradient_accumulation_steps=2
    )
    state = opt.init(jnp.zeros(2))
    u, state = opt.update(jnp.ones(2), state)
    np.testing.assert_array_equal(u, 0.0)  # the first of two calls only accumulates
    u, _ = opt.update(3 * jnp.ones(2), state)
    np.testing.assert_allclose(u, -0.2, rtol=1e-6)  # -lr * mean(1, 3)


def test_keras_finalize_variable_values_reads_the_average() -> None:
    """The average is found wherever the state nests it; without use_ema, params come back."""
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    assert K.finalize_variable_values(params, K.sgd().init(params)) is params
    opt = optax.chain(optax.identity(), optax.inject_hyperparams(K.sgd)(use_ema=True))
    state = opt.init(params)
    for _ in range(2):
        u, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, u)
    # lr 0.01, two SGD steps; the average is the first iterate, then 0.99 a + 0.01 theta_2
    first = np.array([1.0, -2.0]) - 0.01 * np.array([0.5, 0.25])
    expected = 0.99 * first + 0.01 * np.asarray(params["w"])
    np.testing.assert_allclose(K.finalize_variable_values(params, state)["w"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="needs them"):
        K.sgd(use_ema=True).update(grads, K.sgd(use_ema=True).init(params))


@pytest.mark.parametrize(
    ("factory", "hyper"),
    [
        (P.rmsprop, {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1}),
        (P.sgd, {"lr": 0.01, "momentum": 0.9, "dampening": 0.2}),
        (P.adagrad, {"lr": 0.1, "lr_decay": 0.1}),
        (K.rmsprop, {"learning_rate": 0.01, "momentum": 0.9}),
        (
            K.sgd,
            {
                "learning_rate": 0.1,
                "momentum": 0.9,
                "clipnorm": 0.5,
                "loss_scale_factor": 3.0,
                "use_ema": True,
                "ema_momentum": 0.5,
            },
        ),
        (F.rmsprop, {"learning_rate": 0.01, "momentum": 0.9}),
    ],
)
def test_presets_work_under_inject_hyperparams(
    factory: Callable[..., Any], hyper: dict[str, float]
) -> None:
    """Hyperparameters may be traced: no Python branching on their values, same numbers."""
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    grads = [{"w": jnp.cos(jnp.arange(5.0) + i)} for i in range(4)]
    plain = factory(**hyper)
    injected = optax.inject_hyperparams(factory)(**hyper)

    def run(opt: Any) -> Any:
        step = jax.jit(opt.update)
        p, s = params, opt.init(params)
        for g in grads:
            u, s = step(g, s, p)
            p = rmsjax.apply_updates(p, u)
        return p

    np.testing.assert_allclose(run(injected)["w"], run(plain)["w"], rtol=1e-6, atol=1e-7)


RMSJAX_ONLY_ARGUMENTS = {"exclude_from_weight_decay"}


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_signatures_are_the_frameworks(framework: str) -> None:
    """Argument names, order, keyword-only-ness and defaults of the real classes (recorded by
    the generator; arguments listed in its NOT_CARRIED are left out of the presets)."""
    recorded = framework_signatures(framework)
    module = MODULES[framework]
    assert set(recorded) == set(presets_of(module))
    for preset, expected in recorded.items():
        params = inspect.signature(getattr(module, preset)).parameters.values()
        # rmsjax-only keyword-only extras (Keras' exclude_from_weight_decay is a method there)
        extras = [p for p in params if p.name in RMSJAX_ONLY_ARGUMENTS]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
        got = [[p.name, p.kind.name, p.default] for p in params if p not in extras]
        got = [[n, k, list(d) if isinstance(d, tuple) else d] for n, k, d in got]
        assert got == expected, preset


def test_compat_is_importable_as_documented() -> None:
    import rmsjax.compat as compat

    assert compat.pytorch is P and compat.keras is K and compat.tf1 is F
    for module in (P, K, F):
        for name in presets_of(module):
            opt = getattr(module, name)(**({"learning_rate": 0.1} if module is F else {}))
            assert isinstance(opt, optax.GradientTransformation)


def test_generator_reproduces_stored_files() -> None:
    """Optional: needs torch and keras (the ``reference`` extra); skipped without them."""
    import importlib.util
    import subprocess
    import sys

    missing = [m for m in ("torch", "keras") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs the `reference` extra (missing: {', '.join(missing)})")

    result = subprocess.run(
        [sys.executable, str(REF / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_x64_mode_does_not_leak() -> None:
    """The float64 comparisons switch x64 on only inside their own blocks."""
    preset_errors("torch", "x64")
    assert jnp.ones(1).dtype == jnp.float32
    assert not jax.config.jax_enable_x64
