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


# ------------------------------------------------------------------------------------------
# Low-bit optimizer state: bitsandbytes and torchao (lowbit.npz)
# ------------------------------------------------------------------------------------------
#
# ``lowbit.npz`` holds (a) codec vectors: float32 arrays quantized and dequantized by the real
# library functions (bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise`` with
# blocksize 256; torchao's ``OptimState8bit`` / ``OptimState4bit`` filled with ``copy_``), as
# ``codec/<scheme>/{input,codes,scales,decoded}`` plus the libraries' maps ``map/<name>``; and
# (b) trajectories of bitsandbytes ``Adam8bit``, ``AdamW8bit``, ``RMSprop8bit`` and torchao
# ``AdamW8bit``, ``AdamW4bit`` on the CPU: one optimizer holding a tensor above the libraries'
# 4096-entry minimum (``big``, quantized state) and one below it (``small``, float32 state),
# 30 steps. The gradient is a fixed function of the current parameters (NumPy float64, rounded
# to bfloat16 precision so the stored stream compresses), stored as ``<run>/<tensor>/grads``
# (bfloat16 bit patterns, uint16). ``big`` parameters are stored after the steps in
# ``LOWBIT_CHECKPOINTS``, ``small`` ones after every step; the final states are stored as the
# libraries hold them (codes and scales, or float32). ``lowbit_cases`` describes the runs.

LOWBIT_STEPS = 30
LOWBIT_CHECKPOINTS = [1, 2, 10, 30]
LOWBIT_SMALL = (10, 10)
LOWBIT_BIG = {"bitsandbytes": (65, 65), "torchao8": (64, 64), "torchao4": (32, 128)}

LOWBIT_CASES: list[dict[str, Any]] = [
    {
        "name": "bnb_adam8bit_defaults",
        "library": "bitsandbytes",
        "optimizer": "Adam8bit",
        "kwargs": {},
        "scale": 1.0,
    },
    {
        "name": "bnb_adam8bit_flags",
        "library": "bitsandbytes",
        "optimizer": "Adam8bit",
        "kwargs": {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1},
        "scale": 1.0,
    },
    {
        "name": "bnb_adamw8bit_tiny",
        "library": "bitsandbytes",
        "optimizer": "AdamW8bit",
        "kwargs": {"lr": 0.002},
        "scale": 1e-4,
    },
    {
        "name": "bnb_rmsprop8bit_defaults",
        "library": "bitsandbytes",
        "optimizer": "RMSprop8bit",
        "kwargs": {},
        "scale": 1.0,
    },
    {
        "name": "bnb_rmsprop8bit_momentum",
        "library": "bitsandbytes",
        "optimizer": "RMSprop8bit",
        "kwargs": {"lr": 0.001, "alpha": 0.9, "momentum": 0.9, "weight_decay": 0.01},
        "scale": 1.0,
    },
    {
        "name": "torchao_adamw8bit_defaults",
        "library": "torchao8",
        "optimizer": "AdamW8bit",
        "kwargs": {},
        "scale": 1.0,
    },
    {
        "name": "torchao_adamw8bit_flags",
        "library": "torchao8",
        "optimizer": "AdamW8bit",
        "kwargs": {"lr": 0.01, "betas": [0.8, 0.99], "weight_decay": 0.1},
        "scale": 1e-4,
    },
    {
        "name": "torchao_adamw4bit_defaults",
        "library": "torchao4",
        "optimizer": "AdamW4bit",
        "kwargs": {},
        "scale": 1.0,
    },
    {
        "name": "torchao_adamw4bit_flags",
        "library": "torchao4",
        "optimizer": "AdamW4bit",
        "kwargs": {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6},
        "scale": 1.0,
    },
]


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bfloat16_bits(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, np.uint32) << 16).view(np.float32)


def lowbit_start(shape: tuple[int, ...], salt: int) -> np.ndarray:
    return np.random.default_rng([SEED, salt]).normal(size=shape).astype(np.float32)


def lowbit_gradient(params: np.ndarray, scale: float) -> np.ndarray:
    """bfloat16 bit patterns of the gradient at ``params`` (a fixed function of them)."""
    x = np.asarray(params, np.float64)
    centre = 0.3 + 0.5 * (np.arange(x.size) % 7).reshape(x.shape) / 7
    g = (x - centre) * (1.5 + np.sin(x)) + 0.2 * np.cos(3.0 * x)
    return to_bfloat16_bits((scale * g).astype(np.float32))


def _codec_chunks(signed: bool, qmap: np.ndarray, chunk: int) -> np.ndarray:
    """32 chunks of ``chunk`` float32 values exercising the codecs (see LOWBIT comment)."""
    rng = np.random.default_rng([SEED, 11, int(signed), qmap.size])
    scales = [1.0, 1e-3, 1e-8, 1e-5, 1e-20, 1e-30, 1e10, 1e30, 3.7, 0.02, 5e5, 1e-12, 1e-13, 1e-13]
    out = [rng.normal(size=chunk) * s for s in scales]
    out += [np.zeros(chunk), np.zeros(chunk)]
    for big in (10.0, -7.0):  # one outlier in a block of small values
        c = rng.normal(size=chunk) * 1e-3
        c[rng.integers(chunk)] = big
        out.append(c)
    c = rng.normal(size=chunk)
    c[3] = np.nan
    out.append(c)
    c = rng.normal(size=chunk)
    c[5] = np.inf
    out.append(c)
    # Map values, midpoints (possible ties) and their float32 neighbours, behind a leading 1.0
    # so that the block maximum is exactly 1.
    q = qmap.astype(np.float32)
    mids = ((q[:-1].astype(np.float64) + q[1:]) / 2).astype(np.float32)
    special = np.concatenate(
        [q, mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2))]
    )
    n_special = 32 - len(out)
    body = np.resize(special, n_special * (chunk - 1))
    for k in range(n_special):
        out.append(np.concatenate([[1.0], body[k * (chunk - 1) : (k + 1) * (chunk - 1)]]))
    x = np.concatenate(out).astype(np.float32)
    if not signed:
        x = np.abs(x)
    return x


def lowbit_codec_vectors() -> dict[str, np.ndarray]:
    import bitsandbytes.functional as bnbf
    import torch
    from torchao.optim.quant_utils import create_dynamic_map as tao_map
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    arrays: dict[str, np.ndarray] = {}
    maps = {
        "bnb_signed": bnbf.create_dynamic_map(signed=True).numpy(),
        "bnb_unsigned": bnbf.create_dynamic_map(signed=False).numpy(),
        "torchao8_signed": OptimState8bit.zeros((256,), True, 256).qmap.numpy(),
        "torchao8_unsigned": OptimState8bit.zeros((256,), False, 256).qmap.numpy(),
        "torchao4_signed": OptimState4bit.zeros((128,), True, 128).qmap.numpy(),
        "torchao4_unsigned": OptimState4bit.zeros((128,), False, 128).qmap.numpy(),
        "torchao_dynamic4": np.array(tao_map(True, 3, 4), np.float32),
    }
    for name, m in maps.items():
        arrays[f"map/{name}"] = m.astype(np.float32)
    for signed in (True, False):
        kind = "signed" if signed else "unsigned"
        # bitsandbytes: blocks of 256 over the flattened tensor; the (1000,) case ends in a
        # short block.
        code = bnbf.create_dynamic_map(signed=signed)
        x = _codec_chunks(signed, code.numpy(), 128)
        for tag, arr in (("", x), ("_short", x[:1000])):
            q, st = bnbf.quantize_blockwise(
                torch.from_numpy(arr.copy()), code=code.clone(), blocksize=256
            )
            key = f"codec/bnb_{kind}{tag}"
            arrays[f"{key}/input"] = arr
            arrays[f"{key}/codes"] = q.numpy()
            arrays[f"{key}/scales"] = st.absmax.numpy()
            arrays[f"{key}/decoded"] = bnbf.dequantize_blockwise(q, st).numpy()
        for bits, cls, block in ((8, OptimState8bit, 256), (4, OptimState4bit, 128)):
            shape = (64, 64)  # last axis shorter than a block: the flat layout straddles rows
            state = cls.zeros(shape, signed, block)
            x = _codec_chunks(signed, state.qmap.numpy(), 128).reshape(shape)
            state.copy_(torch.from_numpy(x.copy()))
            key = f"codec/torchao{bits}_{kind}"
            arrays[f"{key}/input"] = x
            arrays[f"{key}/codes"] = state.codes.numpy()
            arrays[f"{key}/scales"] = state.scale.numpy()
            arrays[f"{key}/decoded"] = state.dequantize().numpy()
    return arrays


def run_lowbit(case: dict[str, Any]) -> dict[str, np.ndarray]:
    import torch

    if case["library"] == "bitsandbytes":
        import bitsandbytes.optim as lib
    else:
        import torchao.optim as lib
    kw = dict(case["kwargs"])
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    tensors = {"big": LOWBIT_BIG[case["library"]], "small": LOWBIT_SMALL}
    params = {
        name: torch.nn.Parameter(torch.from_numpy(lowbit_start(shape, salt)))
        for salt, (name, shape) in enumerate(tensors.items())
    }
    opt = getattr(lib, case["optimizer"])(list(params.values()), **kw)
    out: dict[str, list[np.ndarray]] = {f"{n}/{k}": [] for n in params for k in ("grads", "params")}
    out["small/params"].append(params["small"].detach().numpy().copy())
    for step in range(1, LOWBIT_STEPS + 1):
        for name, p in params.items():
            g = lowbit_gradient(p.detach().numpy(), case["scale"])
            out[f"{name}/grads"].append(g)
            p.grad = torch.from_numpy(from_bfloat16_bits(g).reshape(p.shape).copy())
        opt.step()
        for name, p in params.items():
            if name == "small" or step in LOWBIT_CHECKPOINTS:
                out[f"{name}/params"].append(p.detach().numpy().copy())
    arrays = {k: np.stack(v) for k, v in out.items()}
    for name, p in params.items():
        state = opt.state[p]
        if case["library"] == "bitsandbytes":
            slots = [("state1", "absmax1"), ("state2", "absmax2")]
            for i, (codes, scales) in enumerate(slots, start=1):
                if codes not in state:
                    continue
                arrays[f"{name}/state{i}"] = state[codes].numpy().copy()
                if scales in state:
                    arrays[f"{name}/state{i}_scales"] = state[scales].numpy().copy()
        else:
            for i, slot in enumerate(("exp_avg", "exp_avg_sq"), start=1):
                s = state[slot]
                if hasattr(s, "codes"):
                    arrays[f"{name}/state{i}"] = s.codes.numpy().copy()
                    arrays[f"{name}/state{i}_scales"] = s.scale.numpy().copy()
                else:
                    arrays[f"{name}/state{i}"] = s.numpy().copy()
    return arrays


# Values for torchao's bfloat16 stochastic rounding: ordinary numbers of both signs, exact
# bfloat16 values, subnormals, zeros, the largest finite bfloat16 and its neighbours.
SR_DRAWS = 4096


def stochastic_rounding_values() -> np.ndarray:
    bits = np.array(
        [
            0x3F800001,
            0x3F808000,
            0x3F80FFFF,
            0xBF80C000,
            0x40490FDB,
            0xC0490FDB,
            0x3A83126F,
            0x00012345,
            0x80008001,
            0x00000000,
            0x80000000,
            0x3F800000,
            0x7F7F0000,
            0x7F7EFFFF,
            0x7F7E8000,
            0xFF7E4000,
            0x477FE000,
            0x33D6BF95,
            0x7F7F8000,
            0xFF7FFFFF,
        ],
        np.uint32,
    )
    rng = np.random.default_rng([SEED, 13])
    more = rng.normal(size=14).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 14)
    return np.concatenate([bits.view(np.float32), more.astype(np.float32)])


def lowbit_stochastic_rounding() -> dict[str, np.ndarray]:
    """torchao's ``_fp32_to_bf16_sr`` applied SR_DRAWS times to each value: how often it
    rounded away from zero (``sr/up_counts``)."""
    import torch
    from torchao.optim.quant_utils import _fp32_to_bf16_sr

    x = stochastic_rounding_values()
    torch.manual_seed(SEED)
    big = torch.from_numpy(np.repeat(x[:, None], SR_DRAWS, axis=1))
    rounded = _fp32_to_bf16_sr(big).view(torch.int16).numpy().astype(np.uint16)
    toward_zero = (x.view(np.uint32) >> 16).astype(np.uint16)
    return {
        "sr/values": x,
        "sr/up_counts": np.sum(rounded != toward_zero[:, None], axis=1).astype(np.int64),
    }


def generate_lowbit() -> dict[str, np.ndarray]:
    arrays = lowbit_codec_vectors()
    arrays.update(lowbit_stochastic_rounding())
    for case in LOWBIT_CASES:
        for key, value in run_lowbit(case).items():
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                raise RuntimeError(f"lowbit {case['name']}/{key}: non-finite values")
            arrays[f"{case['name']}/{key}"] = value
    meta = {
        "steps": LOWBIT_STEPS,
        "sr_draws": SR_DRAWS,
        "checkpoints": LOWBIT_CHECKPOINTS,
        "small": list(LOWBIT_SMALL),
        "big": {k: list(v) for k, v in LOWBIT_BIG.items()},
        "cases": LOWBIT_CASES,
    }
    arrays["lowbit_cases"] = np.array(json.dumps(meta))
    return arrays


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


def lowbit_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "bitsandbytes", "torchao", "numpy")}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise-equal contents (NaN equals NaN: the low-bit codec inputs hold NaN on purpose)."""
    nan_ok = np.issubdtype(a.dtype, np.inexact) and np.issubdtype(b.dtype, np.inexact)
    return np.array_equal(a, b, equal_nan=nan_ok)


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
    if product == "lowbit":
        arrays = generate_lowbit()
        arrays["versions"] = np.array(json.dumps(lowbit_versions()))
        return arrays
    arrays = generate(product)
    arrays["versions"] = np.array(json.dumps(versions()))
    arrays["signatures"] = np.array(json.dumps(signatures(product)))
    return arrays


PRODUCTS = sorted([*FRAMEWORKS, "torch_lr", "lowbit"])


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
                    k == "versions" or _same(stored[k], arrays[k]) for k in stored.files
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
