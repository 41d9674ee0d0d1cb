"""Write the reference trajectories of the real frameworks into ``tests/reference/*.npz``.

Needs the optional extra ``reference`` (torch, keras): ``pip install -e ".[reference]"``, then

    python tests/reference/generate.py            # rewrite the three .npz files
    python tests/reference/generate.py --check    # regenerate in memory and compare with them

The test suite (``tests/test_compat.py``) reads only the .npz files; it never imports torch or
keras.

Every run starts from fixed seeded parameters (6 entries) and makes 30 steps. On each step the
gradient is a fixed nonlinear function of the framework's CURRENT parameters, computed in NumPy
float64 and rounded to the run's dtype; the gradient actually fed is stored with the
parameters, so the test can feed rmsjax exactly the same sequence. Runs use several gradient
scales (1, 1e-6, 1e-8): with tiny gradients the placement of eps decides the trajectory.

* ``torch.npz``: ``torch.optim`` (CPU, default for-loop implementation). Schedules are
  ``torch.optim.lr_scheduler.ExponentialLR``.
* ``keras.npz``: ``keras.optimizers`` with the jax backend (``KERAS_BACKEND=jax``; float64
  needs jax's x64 mode, switched on here). Schedules are
  ``keras.optimizers.schedules.PiecewiseConstantDecay`` with float32-exact values, because Keras
  evaluates schedules and stores the learning rate in float32.
Each file also records the framework classes' argument names, kinds and defaults
(``signatures``), which the tests compare with the presets' signatures.

* ``tf1.npz``: TF1's ``ApplyRMSProp`` / ``ApplyCenteredRMSProp`` kernels stated in NumPy, in
  float64 and float32.

Layout of each file: ``cases`` is a JSON list of ``{"name", "preset", "kwargs", "runs"}``, where
``kwargs`` are the preset's keyword arguments (a schedule is ``{"schedule": {...}}``) and each
run is ``{"key", "dtype", "scale"}``; arrays ``<key>/params`` (steps + 1, 6) and
``<key>/grads`` (steps, 6) hold the trajectory (parameters before each step, then the final
ones) and the gradients fed. A Keras case may also have ``"leaves"``, ``[name, size]`` pairs
that split the 6 entries into separately named variables (for clipping per variable and
weight-decay exclusion by name), and a run with ``use_ema`` stores ``<key>/ema`` (steps, 6),
Keras' moving average of the parameters after each step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
STEPS = 30
SIZE = 6
SEED = 20261121

F32, F64, C64, C128 = "float32", "float64", "complex64", "complex128"


# ------------------------------------------------------------------------------------------
# The problem: fixed start, gradient as a function of the current parameters
# ------------------------------------------------------------------------------------------


def start(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    re = rng.normal(size=SIZE)
    im = rng.normal(size=SIZE)
    if dtype.startswith("complex"):
        return (re + 1j * im).astype(dtype)
    return re.astype(dtype)


def _real_grad(x: np.ndarray, shift: float) -> np.ndarray:
    centre = 0.3 + shift * np.arange(SIZE) / SIZE
    return (x - centre) * (1.5 + np.sin(x)) + 0.2 * np.cos(3.0 * x)


def gradient(params: np.ndarray, scale: float) -> np.ndarray:
    """The gradient fed on a step: NumPy float64 maths, rounded to the parameters' dtype."""
    p = np.asarray(params)
    if np.iscomplexobj(p):
        g = _real_grad(p.real.astype(np.float64), 0.5) + 1j * _real_grad(
            p.imag.astype(np.float64), -0.7
        )
    else:
        g = _real_grad(p.astype(np.float64), 0.5)
    return (scale * g).astype(p.dtype)


# ------------------------------------------------------------------------------------------
# The cases (what the test replays): preset, keyword arguments, runs
# ------------------------------------------------------------------------------------------


def exp_lr(init: float, gamma: float) -> dict[str, Any]:
    return {"schedule": {"kind": "exponential", "init": init, "gamma": gamma}}


def piecewise(boundaries: list[int], values: list[float]) -> dict[str, Any]:
    return {"schedule": {"kind": "piecewise", "boundaries": boundaries, "values": values}}


def runs(*specs: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"dtype": d, "scale": s} for d, s in specs]


BASIC = runs((F64, 1.0), (F32, 1.0), (F64, 1e-8))
TINY = runs((F32, 1e-6), (F32, 1e-8), (F64, 1e-6), (F64, 1e-8))
COMPLEX = runs((C64, 1.0), (C64, 1e-6), (C128, 1.0))
REAL = runs((F64, 1.0), (F32, 1.0))

TORCH_CASES: list[dict[str, Any]] = [
    # RMSprop
    {"name": "rmsprop_defaults", "preset": "rmsprop", "kwargs": {}, "runs": BASIC + COMPLEX},
    {
        "name": "rmsprop_all_flags",
        "preset": "rmsprop",
        "kwargs": {"momentum": 0.9, "centered": True, "weight_decay": 0.1, "maximize": True},
        "runs": BASIC + COMPLEX,
    },
    {
        "name": "rmsprop_tiny",
        "preset": "rmsprop",
        "kwargs": {"alpha": 0.9, "lr": 0.01},
        "runs": TINY + COMPLEX,
    },
    {
        "name": "rmsprop_schedule",
        "preset": "rmsprop",
        "kwargs": {"lr": exp_lr(0.05, 0.85), "momentum": 0.9, "centered": True},
        "runs": BASIC,
    },
    # Adam / AdamW
    {"name": "adam_defaults", "preset": "adam", "kwargs": {}, "runs": BASIC + COMPLEX},
    {
        "name": "adam_all_flags",
        "preset": "adam",
        "kwargs": {
            "lr": 0.05,
            "betas": [0.8, 0.99],
            "weight_decay": 0.1,
            "amsgrad": True,
            "maximize": True,
        },
        "runs": BASIC + COMPLEX,
    },
    {
        "name": "adam_amsgrad",
        "preset": "adam",
        "kwargs": {"lr": 0.1, "amsgrad": True},
        "runs": REAL,
    },
    {"name": "adam_tiny", "preset": "adam", "kwargs": {"lr": 0.01}, "runs": TINY},
    {"name": "adam_schedule", "preset": "adam", "kwargs": {"lr": exp_lr(0.1, 0.9)}, "runs": BASIC},
    {"name": "adamw_defaults", "preset": "adamw", "kwargs": {}, "runs": BASIC + COMPLEX},
    {
        "name": "adamw_all_flags",
        "preset": "adamw",
        "kwargs": {"lr": 0.05, "weight_decay": 0.5, "amsgrad": True, "maximize": True},
        "runs": BASIC + COMPLEX,
    },
    {
        "name": "adamw_schedule",
        "preset": "adamw",
        "kwargs": {"lr": exp_lr(0.1, 0.9), "weight_decay": 0.5},
        "runs": BASIC,
    },
    # SGD (linear in g: no eps, so tiny gradients only scale the run; complex is plain)
    {"name": "sgd_defaults", "preset": "sgd", "kwargs": {}, "runs": REAL},
    {
        "name": "sgd_all_flags",
        "preset": "sgd",
        "kwargs": {
            "lr": 0.05,
            "momentum": 0.9,
            "dampening": 0.3,
            "weight_decay": 0.1,
            "maximize": True,
        },
        "runs": REAL + runs((C64, 1.0)),
    },
    {
        "name": "sgd_nesterov",
        "preset": "sgd",
        "kwargs": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        "runs": REAL,
    },
    {
        "name": "sgd_schedule",
        "preset": "sgd",
        "kwargs": {"lr": exp_lr(0.1, 0.9), "momentum": 0.9, "dampening": 0.5},
        "runs": REAL,
    },
    # Adagrad
    {"name": "adagrad_defaults", "preset": "adagrad", "kwargs": {}, "runs": BASIC + COMPLEX},
    {
        "name": "adagrad_all_flags",
        "preset": "adagrad",
        "kwargs": {
            "lr": 0.1,
            "lr_decay": 0.1,
            "weight_decay": 0.1,
            "initial_accumulator_value": 0.5,
            "maximize": True,
        },
        "runs": BASIC + COMPLEX,
    },
    {"name": "adagrad_tiny", "preset": "adagrad", "kwargs": {"lr": 0.05}, "runs": TINY},
    {
        "name": "adagrad_schedule",
        "preset": "adagrad",
        "kwargs": {"lr": exp_lr(0.2, 0.9), "lr_decay": 0.05},
        "runs": BASIC,
    },
    # Adadelta
    {"name": "adadelta_defaults", "preset": "adadelta", "kwargs": {}, "runs": BASIC + COMPLEX},
    {
        "name": "adadelta_all_flags",
        "preset": "adadelta",
        "kwargs": {"lr": 5.0, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.1, "maximize": True},
        "runs": BASIC + COMPLEX,
    },
    {"name": "adadelta_tiny6", "preset": "adadelta", "kwargs": {"lr": 1e3}, "runs": TINY[::2]},
    {"name": "adadelta_tiny8", "preset": "adadelta", "kwargs": {"lr": 1e5}, "runs": TINY[1::2]},
    {
        "name": "adadelta_schedule",
        "preset": "adadelta",
        "kwargs": {"lr": exp_lr(20.0, 0.9)},
        "runs": BASIC,
    },
    # Rprop (scale-free: tiny gradients walk the same path)
    {"name": "rprop_defaults", "preset": "rprop", "kwargs": {}, "runs": BASIC + TINY + COMPLEX},
    {
        "name": "rprop_all_flags",
        "preset": "rprop",
        "kwargs": {
            "lr": 0.05,
            "etas": [0.3, 1.5],
            "step_sizes": [1e-3, 0.2],
            "maximize": True,
        },
        "runs": BASIC + COMPLEX,
    },
]

KERAS_PIECEWISE = piecewise([9, 19], [2.0**-5, 2.0**-7, 2.0**-9])

KERAS_CASES: list[dict[str, Any]] = [
    {"name": "rmsprop_defaults", "preset": "rmsprop", "kwargs": {}, "runs": REAL},
    {
        "name": "rmsprop_all_flags",
        "preset": "rmsprop",
        "kwargs": {
            "learning_rate": 0.01,
            "momentum": 0.9,
            "centered": True,
            "weight_decay": 0.1,
        },
        "runs": BASIC,
    },
    {"name": "rmsprop_tiny", "preset": "rmsprop", "kwargs": {"learning_rate": 1.0}, "runs": TINY},
    {
        "name": "rmsprop_schedule",
        "preset": "rmsprop",
        "kwargs": {"learning_rate": KERAS_PIECEWISE, "momentum": 0.9},
        "runs": BASIC,
    },
    {"name": "adam_defaults", "preset": "adam", "kwargs": {}, "runs": REAL},
    {
        "name": "adam_all_flags",
        "preset": "adam",
        "kwargs": {
            "learning_rate": 0.05,
            "beta_1": 0.8,
            "beta_2": 0.99,
            "amsgrad": True,
            "weight_decay": 0.1,
        },
        "runs": BASIC,
    },
    {"name": "adam_tiny", "preset": "adam", "kwargs": {"learning_rate": 0.1}, "runs": TINY},
    {
        "name": "adam_schedule",
        "preset": "adam",
        "kwargs": {"learning_rate": KERAS_PIECEWISE},
        "runs": BASIC,
    },
    {"name": "adamw_defaults", "preset": "adamw", "kwargs": {}, "runs": REAL},
    {
        "name": "adamw_all_flags",
        "preset": "adamw",
        "kwargs": {"learning_rate": 0.05, "weight_decay": 0.5, "amsgrad": True},
        "runs": BASIC,
    },
    {
        "name": "adamw_schedule",
        "preset": "adamw",
        "kwargs": {"learning_rate": KERAS_PIECEWISE, "weight_decay": 0.5},
        "runs": BASIC,
    },
    {"name": "sgd_defaults", "preset": "sgd", "kwargs": {}, "runs": REAL},
    {
        "name": "sgd_all_flags",
        "preset": "sgd",
        "kwargs": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        "runs": REAL,
    },
    {
        "name": "sgd_schedule",
        "preset": "sgd",
        "kwargs": {"learning_rate": KERAS_PIECEWISE, "momentum": 0.9},
        "runs": REAL,
    },
    {"name": "adagrad_defaults", "preset": "adagrad", "kwargs": {}, "runs": REAL},
    {
        "name": "adagrad_all_flags",
        "preset": "adagrad",
        "kwargs": {
            "learning_rate": 0.1,
            "initial_accumulator_value": 0.5,
            "epsilon": 1e-3,
            "weight_decay": 0.1,
        },
        "runs": BASIC,
    },
    {
        "name": "adagrad_tiny",
        "preset": "adagrad",
        "kwargs": {"learning_rate": 1.0, "initial_accumulator_value": 0.0},
        "runs": TINY,
    },
    {
        "name": "adagrad_schedule",
        "preset": "adagrad",
        "kwargs": {"learning_rate": KERAS_PIECEWISE},
        "runs": BASIC,
    },
    {"name": "adadelta_defaults", "preset": "adadelta", "kwargs": {}, "runs": REAL},
    {
        "name": "adadelta_all_flags",
        "preset": "adadelta",
        "kwargs": {"learning_rate": 1.0, "rho": 0.8, "epsilon": 1e-4, "weight_decay": 0.1},
        "runs": BASIC,
    },
    {
        "name": "adadelta_tiny6",
        "preset": "adadelta",
        "kwargs": {"learning_rate": 1e3},
        "runs": TINY[::2],
    },
    {
        "name": "adadelta_tiny8",
        "preset": "adadelta",
        "kwargs": {"learning_rate": 1e5},
        "runs": TINY[1::2],
    },
    {
        "name": "adadelta_schedule",
        "preset": "adadelta",
        "kwargs": {"learning_rate": piecewise([9, 19], [8.0, 4.0, 1.0])},
        "runs": BASIC,
    },
]

# Keras' BaseOptimizer arguments. "leaves" splits the 6 entries into named variables (a dict
# of leaves in the test), so that per-variable and global clipping and weight-decay exclusion
# by name differ from one variable; "ema" runs also store the moving average after each step.
KERAS_LEAVES = [["kernel", 2], ["bias", 4]]
KERAS_SGD_PIECEWISE = piecewise([9, 19], [2.0**-3, 2.0**-4, 2.0**-6])

KERAS_OPTION_CASES: list[dict[str, Any]] = [
    {
        "name": "sgd_clipnorm",
        "preset": "sgd",
        "kwargs": {"learning_rate": 0.1, "momentum": 0.9, "clipnorm": 0.5},
        "leaves": KERAS_LEAVES,
        "runs": REAL,
    },
    {
        "name": "sgd_global_clipnorm",
        "preset": "sgd",
        "kwargs": {"learning_rate": 0.1, "momentum": 0.9, "global_clipnorm": 0.7},
        "leaves": KERAS_LEAVES,
        "runs": REAL,
    },
    {
        "name": "adagrad_clipvalue",
        "preset": "adagrad",
        "kwargs": {"learning_rate": 0.1, "clipvalue": 0.2},
        "runs": REAL,
    },
    {
        "name": "adagrad_loss_scale",
        "preset": "adagrad",
        "kwargs": {"learning_rate": 0.1, "loss_scale_factor": 1000.0},
        "runs": runs((F64, 1000.0), (F32, 1000.0)),
    },
    {
        "name": "adam_global_clipnorm_ema",
        "preset": "adam",
        "kwargs": {"learning_rate": 0.05, "global_clipnorm": 1.0, "use_ema": True},
        "leaves": KERAS_LEAVES,
        "runs": REAL,
    },
    {
        "name": "rmsprop_ema_overwrite",
        "preset": "rmsprop",
        "kwargs": {
            "learning_rate": 0.01,
            "momentum": 0.9,
            "use_ema": True,
            "ema_momentum": 0.8,
            "ema_overwrite_frequency": 4,
        },
        "runs": REAL,
    },
    {
        "name": "adam_accumulate_schedule",
        "preset": "adam",
        "kwargs": {"learning_rate": KERAS_PIECEWISE, "gradient_accumulation_steps": 3},
        "runs": REAL,
    },
    {
        "name": "sgd_accumulate_weight_decay",
        "preset": "sgd",
        "kwargs": {
            "learning_rate": KERAS_SGD_PIECEWISE,
            "momentum": 0.9,
            "weight_decay": 0.5,
            "gradient_accumulation_steps": 4,
            "exclude_from_weight_decay": ["bias"],
        },
        "leaves": KERAS_LEAVES,
        "runs": REAL,
    },
    {
        "name": "adadelta_clipnorm_ema",
        "preset": "adadelta",
        "kwargs": {
            "learning_rate": 1.0,
            "clipnorm": 0.1,
            "use_ema": True,
            "ema_overwrite_frequency": 10,
        },
        "runs": REAL,
    },
    {
        "name": "adamw_clipvalue_accumulate_ema",
        "preset": "adamw",
        "kwargs": {
            "learning_rate": 0.05,
            "weight_decay": 0.5,
            "clipvalue": 0.5,
            "use_ema": True,
            "ema_overwrite_frequency": 7,
            "gradient_accumulation_steps": 2,
        },
        "runs": REAL,
    },
    {
        "name": "rmsprop_every_option",
        "preset": "rmsprop",
        "kwargs": {
            "learning_rate": KERAS_PIECEWISE,
            "momentum": 0.9,
            "centered": True,
            "weight_decay": 0.2,
            "clipnorm": 1.0,
            "use_ema": True,
            "ema_momentum": 0.9,
            "ema_overwrite_frequency": 2,
            "loss_scale_factor": 10.0,
            "gradient_accumulation_steps": 3,
            "exclude_from_weight_decay": ["kernel"],
        },
        "leaves": KERAS_LEAVES,
        "runs": runs((F64, 10.0), (F32, 10.0)),
    },
]

TF1_CASES: list[dict[str, Any]] = [
    {
        "name": "rmsprop_defaults",
        "preset": "rmsprop",
        "kwargs": {"learning_rate": 0.01},
        "runs": REAL,
    },
    {
        "name": "rmsprop_all_flags",
        "preset": "rmsprop",
        "kwargs": {"learning_rate": 0.01, "decay": 0.8, "momentum": 0.9, "centered": True},
        "runs": BASIC,
    },
    {
        "name": "rmsprop_tiny6",
        "preset": "rmsprop",
        "kwargs": {"learning_rate": 1e3},
        "runs": TINY[::2],
    },
    {
        "name": "rmsprop_tiny8",
        "preset": "rmsprop",
        "kwargs": {"learning_rate": 1e5},
        "runs": TINY[1::2],
    },
    {
        "name": "rmsprop_centered_tiny",
        "preset": "rmsprop",
        "kwargs": {"learning_rate": 1e3, "centered": True, "epsilon": 1e-12},
        "runs": TINY[::2],
    },
    {
        "name": "rmsprop_schedule",
        "preset": "rmsprop",
        "kwargs": {"learning_rate": piecewise([9, 19], [0.05, 0.02, 0.01]), "momentum": 0.9},
        "runs": BASIC,
    },
]


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


def schedule_value(spec: dict[str, Any], count: int) -> float:
    """The learning rate of step ``count`` (0, 1, 2, ...), in Python float64."""
    if spec["kind"] == "exponential":
        return spec["init"] * spec["gamma"] ** count
    value = spec["values"][-1]
    for boundary, v in zip(spec["boundaries"], spec["values"], strict=False):
        if count <= boundary:
            value = v
            break
    return value


def _is_schedule(value: Any) -> bool:
    return isinstance(value, dict) and "schedule" in value


# ------------------------------------------------------------------------------------------
# Runners
# ------------------------------------------------------------------------------------------


def run_torch(preset: str, kwargs: dict[str, Any], dtype: str, scale: float):
    import torch

    classes = {
        "rmsprop": torch.optim.RMSprop,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "adadelta": torch.optim.Adadelta,
        "rprop": torch.optim.Rprop,
    }
    kw = dict(kwargs)
    sched = None
    if _is_schedule(kw.get("lr")):
        sched = kw["lr"]["schedule"]
        assert sched["kind"] == "exponential"
        kw["lr"] = sched["init"]
    for key in ("betas", "etas", "step_sizes"):
        if key in kw:
            kw[key] = tuple(kw[key])
    p = torch.nn.Parameter(torch.from_numpy(start(dtype)))
    opt = classes[preset]([p], **kw)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=sched["gamma"]) if sched else None
    params, grads = [p.detach().numpy().copy()], []
    for _ in range(STEPS):
        g = gradient(params[-1], scale)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        if scheduler is not None:
            scheduler.step()
        grads.append(g)
        params.append(p.detach().numpy().copy())
    return np.stack(params), np.stack(grads)


def run_keras(
    preset: str,
    kwargs: dict[str, Any],
    dtype: str,
    scale: float,
    leaves: list[list[Any]] | None = None,
):
    import keras

    classes = {
        "rmsprop": keras.optimizers.RMSprop,
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "adagrad": keras.optimizers.Adagrad,
        "adadelta": keras.optimizers.Adadelta,
    }
    kw = dict(kwargs)
    exclude = kw.pop("exclude_from_weight_decay", None)
    if _is_schedule(kw.get("learning_rate")):
        spec = kw["learning_rate"]["schedule"]
        assert spec["kind"] == "piecewise"
        kw["learning_rate"] = keras.optimizers.schedules.PiecewiseConstantDecay(
            spec["boundaries"], spec["values"]
        )
    if leaves is None:
        variables = [keras.Variable(start(dtype), dtype=dtype)]
    else:
        parts = np.split(start(dtype), np.cumsum([size for _, size in leaves])[:-1])
        variables = [
            keras.Variable(part, dtype=dtype, name=name)
            for (name, _), part in zip(leaves, parts, strict=True)
        ]
    opt = classes[preset](**kw)
    if exclude is not None:
        opt.exclude_from_weight_decay(var_names=exclude)

    def joined(vs: list[Any]) -> np.ndarray:
        return np.concatenate([np.array(v.numpy()) for v in vs])

    params, grads, averages = [joined(variables)], [], []
    for _ in range(STEPS):
        g = gradient(params[-1], scale)
        g_parts = np.split(g, np.cumsum([v.shape[0] for v in variables])[:-1])
        opt.apply_gradients(
            [
                (keras.ops.convert_to_tensor(part, dtype=dtype), var)
                for part, var in zip(g_parts, variables, strict=True)
            ]
        )
        grads.append(g)
        params.append(joined(variables))
        if kw.get("use_ema"):
            averages.append(joined(opt._model_variables_moving_average))
    extra = {"ema": np.stack(averages)} if averages else {}
    return np.stack(params), np.stack(grads), extra


def run_tf1(preset: str, kwargs: dict[str, Any], dtype: str, scale: float):
    """TF1's ApplyRMSProp / ApplyCenteredRMSProp kernels, stated in NumPy in ``dtype``."""
    assert preset == "rmsprop"
    t = np.dtype(dtype).type
    lr_arg = kwargs["learning_rate"]
    rho = t(kwargs.get("decay", 0.9))
    momentum = t(kwargs.get("momentum", 0.0))
    eps = t(kwargs.get("epsilon", 1e-10))
    centered = kwargs.get("centered", False)
    var = start(dtype)
    ms = np.ones_like(var)  # the "rms" slot starts at one
    mg = np.zeros_like(var)
    mom = np.zeros_like(var)
    one = t(1)
    params, grads = [var.copy()], []
    for step in range(STEPS):
        lr = t(schedule_value(lr_arg["schedule"], step) if _is_schedule(lr_arg) else lr_arg)
        g = gradient(var, scale)
        ms = ms + (g * g - ms) * (one - rho)
        if centered:
            mg = mg + (g - mg) * (one - rho)
            denom = ms - mg * mg + eps
        else:
            denom = ms + eps
        mom = mom * momentum + lr * g / np.sqrt(denom)
        var = var - mom
        grads.append(g)
        params.append(var.copy())
    return np.stack(params), np.stack(grads)


FRAMEWORKS = {
    "torch": (TORCH_CASES, run_torch),
    "keras": (KERAS_CASES + KERAS_OPTION_CASES, run_keras),
    "tf1": (TF1_CASES, run_tf1),
}


def generate(framework: str) -> dict[str, np.ndarray]:
    cases, runner = FRAMEWORKS[framework]
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for case in cases:
        entry = {k: case[k] for k in ("name", "preset", "kwargs", "leaves") if k in case}
        options = {"leaves": case["leaves"]} if "leaves" in case else {}
        entry["runs"] = []
        for run in case["runs"]:
            key = f"{case['name']}|{run['dtype']}|{run['scale']:g}"
            params, grads, *extra = runner(
                case["preset"], case["kwargs"], run["dtype"], run["scale"], **options
            )
            if not (np.all(np.isfinite(params)) and np.all(np.isfinite(grads))):
                raise RuntimeError(f"{framework} {key}: non-finite trajectory")
            arrays[f"{key}/params"] = params
            arrays[f"{key}/grads"] = grads
            for name, values in (extra[0] if extra else {}).items():
                arrays[f"{key}/{name}"] = values
            entry["runs"].append({"key": key, **run})
        meta.append(entry)
    arrays["cases"] = np.array(json.dumps(meta))
    return arrays


# Arguments the presets deliberately do not take (implementation switches with the same numbers,
# and Keras' **kwargs, which takes only the long-ignored `decay`).
NOT_CARRIED = {
    "params",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
    "kwargs",
}


def signatures(framework: str) -> dict[str, list[list[Any]]]:
    """The framework classes' own arguments: [name, kind, default] in order, per preset."""
    import inspect

    if framework == "torch":
        import torch

        classes = {
            "rmsprop": torch.optim.RMSprop,
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "sgd": torch.optim.SGD,
            "adagrad": torch.optim.Adagrad,
            "adadelta": torch.optim.Adadelta,
            "rprop": torch.optim.Rprop,
        }
    elif framework == "keras":
        import keras

        classes = {
            "rmsprop": keras.optimizers.RMSprop,
            "adam": keras.optimizers.Adam,
            "adamw": keras.optimizers.AdamW,
            "sgd": keras.optimizers.SGD,
            "adagrad": keras.optimizers.Adagrad,
            "adadelta": keras.optimizers.Adadelta,
        }
    else:
        return {}
    out = {}
    for preset, cls in classes.items():
        params = inspect.signature(cls).parameters.values()
        out[preset] = [
            [p.name, p.kind.name, p.default] for p in params if p.name not in NOT_CARRIED
        ]
    return out


def versions() -> dict[str, str]:
    import keras
    import torch

    return {"torch": torch.__version__, "keras": keras.__version__, "numpy": np.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--only", choices=sorted(FRAMEWORKS), action="append")
    args = parser.parse_args()
    ok = True
    for framework in args.only or sorted(FRAMEWORKS):
        arrays = generate(framework)
        arrays["versions"] = np.array(json.dumps(versions()))
        arrays["signatures"] = np.array(json.dumps(signatures(framework)))
        path = HERE / f"{framework}.npz"
        if args.check:
            with np.load(path) as stored:
                same = set(stored.files) == set(arrays) and all(
                    k == "versions" or np.array_equal(stored[k], arrays[k]) for k in stored.files
                )
            print(f"{path.name}: {'identical' if same else 'DIFFERENT'}")
            ok &= same
        else:
            np.savez_compressed(path, **arrays)
            print(f"wrote {path.name}: {path.stat().st_size} bytes")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_ENABLE_X64", "1")  # Keras float64 variables need jax's x64 mode
    sys.exit(main())
