"""Write the reference trajectories of the real frameworks into ``tests/reference/*.npz``.

Needs the optional extra ``reference`` (torch, keras): ``pip install -e ".[reference]"``, then

    python tests/reference/generate.py            # rewrite the four .npz files
    python tests/reference/generate.py --check    # regenerate in memory and compare with them
    python tests/reference/generate.py --only torch_lr   # one file

The test suite (``tests/test_compat.py``, ``tests/test_lr_scheduler.py``) reads only the .npz
files; it never imports torch or keras.

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

* ``torch_lr.npz``: the learning rates of ``torch.optim.lr_scheduler`` runs (see "Learning-rate
  schedulers" below for its layout), and the scheduler classes' signatures.

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


# ------------------------------------------------------------------------------------------
# Learning-rate schedulers (torch_lr.npz)
# ------------------------------------------------------------------------------------------
#
# Each case builds one torch scheduler on an SGD optimizer and records
# ``param_groups[0]["lr"]`` before each of LR_STEPS ``optimizer.step()`` calls, with
# ``scheduler.step()`` after every ``updates_per_epoch``-th update (1: per-step stepping). For
# ReduceLROnPlateau, ``scheduler.step(value)`` reads the value fed with the epoch's last
# update. Layout: ``cases`` is a JSON list of ``{"key", "scheduler", "lr", "kwargs",
# "updates_per_epoch"}`` (``lr`` None for OneCycleLR, which sets its own); arrays
# ``<key>/lr`` (LR_STEPS,) hold the learning rates and, for ReduceLROnPlateau,
# ``<key>/values`` (LR_STEPS,) the values fed. A LambdaLR ``lr_lambda`` is a key of
# LR_LAMBDAS; a SequentialLR's ``schedulers`` are ``{"scheduler", "kwargs"}`` dicts.

LR_STEPS = 300
EPOCH = 4  # updates per scheduler step in the per-epoch runs

# Written with operators that work on a Python int (torch) and on a jax int32 array (rmsjax).
LR_LAMBDAS = {
    "halve_every_10": lambda e: 0.5 ** (e // 10),
    "inverse_time": lambda e: 1.0 / (1.0 + 0.05 * e),
    "sawtooth_warmup": lambda e: (e % 50 + 1) / 50,
}


def plateau_losses() -> np.ndarray:
    """A loss that improves, stalls (with noise far below the thresholds), improves, stalls."""
    k = np.arange(LR_STEPS, dtype=np.float64)
    loss = np.where(k < 40, 1.0 - 0.01 * k, 0.6 + 1e-6 * (-1.0) ** k)
    loss = np.where((k >= 100) & (k < 140), 0.6 - 0.004 * (k - 99), loss)
    loss = np.where((k >= 140) & (k < 220), 0.44 + 1e-5 + 1e-3 * np.abs(np.sin(k)), loss)
    return np.where(k >= 220, 0.44 - 7e-4 * (k - 219), loss)


def _sched(name: str, lr: float | None, modes: tuple[int, ...] = (1, EPOCH), **kwargs: Any):
    return [{"scheduler": name, "lr": lr, "kwargs": kwargs, "updates_per_epoch": n} for n in modes]


def _child(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"scheduler": name, "kwargs": kwargs}


LR_CASES: list[dict[str, Any]] = [
    *_sched("StepLR", 0.1, step_size=7, gamma=0.5),
    *_sched("StepLR", 0.5, step_size=50),
    *_sched("MultiStepLR", 0.1, milestones=[30, 80, 80, 200], gamma=0.5),
    *_sched("MultiStepLR", 1.0, milestones=[100, 20, 0]),
    *_sched("ExponentialLR", 0.1, gamma=0.97),
    *_sched("ExponentialLR", 2.0, gamma=0.999),
    *_sched("CosineAnnealingLR", 0.1, T_max=50),
    *_sched("CosineAnnealingLR", 0.05, T_max=299, eta_min=1e-4),
    *_sched("CosineAnnealingLR", 0.1, T_max=7, eta_min=0.01),
    *_sched("CosineAnnealingLR", 0.1, T_max=1),
    *_sched("CosineAnnealingWarmRestarts", 0.1, T_0=10),
    *_sched("CosineAnnealingWarmRestarts", 0.1, T_0=5, T_mult=2, eta_min=1e-3),
    *_sched("CosineAnnealingWarmRestarts", 0.02, T_0=3, T_mult=3),
    *_sched("LinearLR", 0.1),
    *_sched("LinearLR", 0.1, start_factor=1.0, end_factor=0.0, total_iters=200),
    *_sched("LinearLR", 0.1, start_factor=0.1, total_iters=0),
    *_sched("OneCycleLR", None, (1,), max_lr=0.1, total_steps=LR_STEPS - 1),
    *_sched(
        "OneCycleLR",
        None,
        (1,),
        max_lr=0.05,
        total_steps=LR_STEPS - 1,
        pct_start=0.25,
        anneal_strategy="linear",
        three_phase=True,
        div_factor=10.0,
        final_div_factor=100.0,
    ),
    *_sched("OneCycleLR", None, (1,), max_lr=0.01, epochs=13, steps_per_epoch=23),
    *_sched("OneCycleLR", None, (EPOCH,), max_lr=0.1, total_steps=LR_STEPS // EPOCH - 1),
    *_sched(
        "OneCycleLR",
        None,
        (EPOCH,),
        max_lr=0.1,
        total_steps=LR_STEPS // EPOCH - 1,
        three_phase=True,
    ),
    *_sched("LambdaLR", 0.1, lr_lambda="halve_every_10"),
    *_sched("LambdaLR", 0.1, lr_lambda="inverse_time"),
    *_sched("LambdaLR", 0.1, lr_lambda="sawtooth_warmup"),
    *_sched(
        "SequentialLR",
        0.1,
        schedulers=[
            _child("LinearLR", start_factor=0.1, total_iters=10),
            _child("CosineAnnealingLR", T_max=100),
        ],
        milestones=[10],
    ),
    *_sched(
        "SequentialLR",
        0.1,
        schedulers=[
            _child("ExponentialLR", gamma=0.9),
            _child("StepLR", step_size=20, gamma=0.5),
            _child("CosineAnnealingWarmRestarts", T_0=30),
            _child("LambdaLR", lr_lambda="sawtooth_warmup"),
        ],
        milestones=[25, 100, 150],
    ),
    *_sched("ReduceLROnPlateau", 0.1),
    *_sched("ReduceLROnPlateau", 1e-3, (1,), factor=0.5, patience=3, eps=1e-4),
    *_sched(
        "ReduceLROnPlateau",
        0.05,
        mode="max",
        factor=0.3,
        patience=2,
        threshold=1e-3,
        threshold_mode="abs",
        cooldown=5,
        min_lr=0.004,
    ),
    *_sched("ReduceLROnPlateau", 1.0, patience=0, threshold=0.0, factor=0.9, min_lr=0.01),
]


def _torch_scheduler(opt: Any, name: str, kwargs: dict[str, Any]) -> Any:
    import torch

    kw = dict(kwargs)
    if name == "LambdaLR":
        kw["lr_lambda"] = LR_LAMBDAS[kw["lr_lambda"]]
    if name == "SequentialLR":
        kw["schedulers"] = [
            _torch_scheduler(opt, c["scheduler"], c["kwargs"]) for c in kw["schedulers"]
        ]
    return getattr(torch.optim.lr_scheduler, name)(opt, **kw)


def lr_key(case: dict[str, Any], index: int) -> str:
    return f"{index:02d}_{case['scheduler']}|{case['updates_per_epoch']}"


def run_torch_lr(case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    import warnings

    import torch

    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=1.0 if case["lr"] is None else case["lr"])
    plateau = case["scheduler"] == "ReduceLROnPlateau"
    values = None
    if plateau:
        values = plateau_losses() * (-1.0 if case["kwargs"].get("mode") == "max" else 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = _torch_scheduler(opt, case["scheduler"], case["kwargs"])
        lrs = []
        for k in range(LR_STEPS):
            lrs.append(float(opt.param_groups[0]["lr"]))
            param.grad = torch.zeros_like(param)
            opt.step()
            if k + 1 < LR_STEPS and (k + 1) % case["updates_per_epoch"] == 0:
                scheduler.step(float(values[k])) if plateau else scheduler.step()
    return np.asarray(lrs, np.float64), values


def generate_torch_lr() -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for index, case in enumerate(LR_CASES):
        key = lr_key(case, index)
        lrs, values = run_torch_lr(case)
        if not np.all(np.isfinite(lrs)):
            raise RuntimeError(f"torch_lr {key}: non-finite learning rate")
        arrays[f"{key}/lr"] = lrs
        if values is not None:
            arrays[f"{key}/values"] = values
        meta.append({"key": key, **case})
    arrays["cases"] = np.array(json.dumps(meta))
    return arrays


LR_SCHEDULERS = [
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "LinearLR",
    "OneCycleLR",
    "LambdaLR",
    "SequentialLR",
    "ReduceLROnPlateau",
]
# Scheduler arguments the presets do not take: the optimizer (replaced by its initial ``lr``),
# the resume index, and OneCycleLR's momentum cycling (documented there).
LR_NOT_CARRIED = {"optimizer", "last_epoch", "cycle_momentum", "base_momentum", "max_momentum"}
REQUIRED = "<required>"


def scheduler_signatures() -> dict[str, list[list[Any]]]:
    """torch's scheduler arguments: [name, kind, default or REQUIRED] in order, per class."""
    import inspect

    import torch

    out = {}
    for name in LR_SCHEDULERS:
        params = inspect.signature(getattr(torch.optim.lr_scheduler, name)).parameters.values()
        out[name] = [
            [p.name, p.kind.name, REQUIRED if p.default is inspect.Parameter.empty else p.default]
            for p in params
            if p.name not in LR_NOT_CARRIED
        ]
    return out


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


def build(product: str) -> dict[str, np.ndarray]:
    """The arrays of ``<product>.npz``."""
    if product == "torch_lr":
        import torch

        arrays = generate_torch_lr()
        arrays["versions"] = np.array(
            json.dumps({"torch": torch.__version__, "numpy": np.__version__})
        )
        arrays["signatures"] = np.array(json.dumps(scheduler_signatures()))
        return arrays
    arrays = generate(product)
    arrays["versions"] = np.array(json.dumps(versions()))
    arrays["signatures"] = np.array(json.dumps(signatures(product)))
    return arrays


PRODUCTS = sorted([*FRAMEWORKS, "torch_lr"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--only", choices=PRODUCTS, action="append")
    args = parser.parse_args()
    ok = True
    for product in args.only or PRODUCTS:
        arrays = build(product)
        path = HERE / f"{product}.npz"
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
