"""Every public factory rejects every bad hyperparameter at construction, naming it.

The factories are found by walking the public API (``rmsjax``, ``rmsjax.compat.*``,
``rmsjax.fused``, ``rmsjax.schedules``), not by listing them, so a new factory is probed
without touching this file. Each numeric argument (annotated ``ArrayLike``, ``float`` or
``ScalarOrSchedule``, alone or in a pair such as torch's ``betas``) is fed, one at a time, a set
of values that are not a valid hyperparameter; each must raise ``TypeError`` or ``ValueError``
when the transformation is built, with the argument's name (as the user typed it) in the
message. The valid baselines come from the signature's defaults.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import rmsjax
import rmsjax.compat.keras
import rmsjax.compat.pytorch
import rmsjax.compat.tf1
import rmsjax.fused
import rmsjax.schedules

# Public functions that are not hyperparameter factories (or take no numeric argument).
NOT_FACTORIES = {
    "apply_updates",  # trees
    "state_sharding",  # an optimizer and a tree
    "precise_debias",  # a numerical helper, its callers validate
    "split_real_and_imaginary",  # wraps a transformation
    "scale_by_schedule",  # takes a schedule only (tested in test_validation.py)
    "inject_hyperparams",  # rmsjax.fused's wrapper of a factory
    "stochastic_round",  # arrays and a PRNG key
    "apply_updates_stochastic",  # trees and a PRNG key
}
# Required arguments get these valid values; every other argument keeps its default.
VALID = {
    "learning_rate": 0.1,
    "lr": 0.1,
    "decay": 0.9,
    "step_size": 0.5,
    "weight_decay": 0.1,
    "init_value": 0.1,
    "decay_rate": 0.5,
    "decay_steps": 10,
}
# (factory, argument) whose valid range includes negative numbers.
NEGATIVE_OK = {("scale", "step_size"), ("inverse_time_decay", "init_value")}
NUMERIC = ("ArrayLike", "ScalarOrSchedule", "float")


def _schedule(count: Any) -> float:
    return 0.1


def _modules() -> Iterator[tuple[str, Any]]:
    yield "rmsjax", rmsjax
    yield "rmsjax.schedules", rmsjax.schedules
    yield "rmsjax.compat.pytorch", rmsjax.compat.pytorch
    yield "rmsjax.compat.keras", rmsjax.compat.keras
    yield "rmsjax.compat.tf1", rmsjax.compat.tf1
    yield "rmsjax.fused", rmsjax.fused


def _factories() -> list[tuple[str, Callable[..., Any]]]:
    found: dict[int, tuple[str, Callable[..., Any]]] = {}
    for prefix, module in _modules():
        for name in module.__all__:
            obj = getattr(module, name)
            if (
                inspect.isfunction(obj)
                and obj.__module__.startswith("rmsjax")  # not optax's re-exported functions
                and name not in NOT_FACTORIES
            ):
                found.setdefault(id(obj), (f"{prefix}.{name}", obj))
    return sorted(found.values())


def _cases() -> list[tuple[str, Callable[..., Any], str, int | None, bool]]:
    """(factory name, factory, argument, element index of a pair or None, schedule allowed)."""
    cases = []
    for qualname, factory in _factories():
        for arg, param in inspect.signature(factory).parameters.items():
            ann = str(param.annotation)
            if "DTypeLike" in ann or not any(t in ann for t in NUMERIC):
                continue
            if ann.startswith("tuple["):
                for i in range(len(param.default)):
                    cases.append((qualname, factory, arg, i, False))
            else:
                cases.append((qualname, factory, arg, None, "ScalarOrSchedule" in ann))
    return cases


CASES = _cases()


def _bad_values(short: str, arg: str, default: Any, schedule: bool) -> list[Any]:
    values: list[Any] = ["0.5", [0.5], np.ones(2), True, math.nan, math.inf, 0.5 + 0.5j]
    if default is not None:  # None is meaningful only where it is the documented default
        values.append(None)
    if (short, arg) not in NEGATIVE_OK:
        values.append(-1.0)
    if not schedule:
        values.append(_schedule)
    return values


def _baseline(factory: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: VALID[name]
        for name, p in inspect.signature(factory).parameters.items()
        if p.default is inspect.Parameter.empty
    }


def test_the_walk_finds_every_kind_of_factory() -> None:
    names = {name for name, *_ in CASES}
    for expected in [
        "rmsjax.rmsprop",
        "rmsjax.scale_by_rprop",
        "rmsjax.scale",
        "rmsjax.trace",
        "rmsjax.inverse_time_decay",
        "rmsjax.compat.pytorch.adam",
        "rmsjax.compat.keras.rmsprop",
        "rmsjax.compat.tf1.rmsprop",
        "rmsjax.fused.sgd",
    ]:
        assert expected in names
    assert len(CASES) > 100


@pytest.mark.parametrize(
    ("qualname", "factory", "arg", "index", "schedule"),
    CASES,
    ids=[f"{q}-{a}" + ("" if i is None else f"[{i}]") for q, _, a, i, _ in CASES],
)
def test_bad_values_raise_at_construction_naming_the_argument(
    qualname: str, factory: Callable[..., Any], arg: str, index: int | None, schedule: bool
) -> None:
    short = qualname.rsplit(".", 1)[1]
    kwargs = _baseline(factory)
    default = inspect.signature(factory).parameters[arg].default
    factory(**kwargs)  # the baseline itself is valid
    shown = arg if index is None else f"{arg}[{index}]"
    current = kwargs.get(arg, default)
    failures = []
    for bad in _bad_values(short, arg, current, schedule):
        if index is None:
            value: Any = bad
        else:
            value = list(default)
            value[index] = bad
            value = tuple(value)
        try:
            factory(**{**kwargs, arg: value})
        except (TypeError, ValueError) as err:
            message = str(err)
            # the compat presets call their arguments by the framework's names
            if f"`{shown}`" not in message:
                failures.append(f"{bad!r}: message does not name `{shown}`: {message}")
        else:
            failures.append(f"{bad!r}: accepted")
    assert not failures, f"{qualname}({shown}=...):\n  " + "\n  ".join(failures)
