"""``rmsjax.compat.pytorch`` presets: a bad value of every numeric argument raises at
construction, and the message names torch's argument (``alpha``, ``betas[0]``, ...) and the
range of the rmsjax transformation that checks it.

The ranges are stated here independently (from the presets' docstrings), so a preset whose
documented range disagreed with the transformation it calls would fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optax
import pytest

import rmsjax.compat.pytorch as P

# (preset, torch argument, keyword arguments with one bad value, interval shown, the rmsjax
# name the message must NOT use instead)
BAD: list[tuple[Callable[..., Any], str, dict[str, Any], str, str | None]] = [
    (P.rmsprop, "lr", {"lr": -0.1}, "[0, inf)", "learning_rate"),
    (P.rmsprop, "lr", {"lr": math.nan}, "[0, inf)", "learning_rate"),
    (P.rmsprop, "alpha", {"alpha": 1.0}, "[0, 1)", "decay"),
    (P.rmsprop, "alpha", {"alpha": -0.5, "centered": True}, "[0, 1)", "decay"),
    (P.rmsprop, "eps", {"eps": -1e-8}, "[0, inf)", None),
    (P.rmsprop, "weight_decay", {"weight_decay": -0.1}, "[0, inf)", None),
    (P.rmsprop, "momentum", {"momentum": 1.5}, "[0, 1]", "decay"),
    (P.rmsprop, "momentum", {"momentum": -0.1}, "[0, 1]", "decay"),
    (P.adam, "lr", {"lr": -1e-3}, "[0, inf)", "learning_rate"),
    (P.adam, "betas[0]", {"betas": (1.0, 0.999)}, "[0, 1)", "b1"),
    (P.adam, "betas[1]", {"betas": (0.9, -0.1)}, "[0, 1)", "b2"),
    (P.adam, "eps", {"eps": -1.0}, "[0, inf)", None),
    (P.adam, "weight_decay", {"weight_decay": -1.0}, "[0, inf)", None),
    (P.adamw, "lr", {"lr": math.inf}, "[0, inf)", "learning_rate"),
    (P.adamw, "betas[0]", {"betas": (-0.9, 0.999)}, "[0, 1)", "b1"),
    (P.adamw, "betas[1]", {"betas": (0.9, 1.0)}, "[0, 1)", "b2"),
    (P.adamw, "eps", {"eps": -1e-8}, "[0, inf)", None),
    (P.adamw, "weight_decay", {"weight_decay": -1e-2}, "[0, inf)", None),
    (P.sgd, "lr", {"lr": -0.1}, "[0, inf)", "learning_rate"),
    (P.sgd, "momentum", {"momentum": -0.9}, "[0, 1]", "decay"),
    (P.sgd, "momentum", {"momentum": 1.1}, "[0, 1]", "decay"),
    (P.sgd, "dampening", {"momentum": 0.9, "dampening": 1.5}, "[0, 1]", None),
    (P.sgd, "weight_decay", {"weight_decay": -0.1}, "[0, inf)", None),
    (P.adagrad, "lr", {"lr": -0.1}, "[0, inf)", "learning_rate"),
    (P.adagrad, "lr_decay", {"lr_decay": -1.0}, "[0, inf)", None),
    (P.adagrad, "weight_decay", {"weight_decay": -1.0}, "[0, inf)", None),
    (P.adagrad, "initial_accumulator_value", {"initial_accumulator_value": -1.0}, "[0, inf)", None),
    (P.adagrad, "eps", {"eps": -1.0}, "[0, inf)", None),
    (P.adadelta, "lr", {"lr": -1.0}, "[0, inf)", "learning_rate"),
    (P.adadelta, "rho", {"rho": 1.0}, "[0, 1)", None),
    (P.adadelta, "rho", {"rho": -0.1}, "[0, 1)", None),
    (P.adadelta, "eps", {"eps": 0.0}, "(0, inf)", None),
    (P.adadelta, "weight_decay", {"weight_decay": -0.1}, "[0, inf)", None),
    (P.rprop, "lr", {"lr": -1e-2}, "[0, inf)", "learning_rate"),
    (P.rprop, "etas[0]", {"etas": (1.5, 1.2)}, "(0, 1)", "eta_minus"),
    (P.rprop, "etas[1]", {"etas": (0.5, 0.9)}, "(1, inf)", "eta_plus"),
    (P.rprop, "step_sizes[0]", {"step_sizes": (0.0, 50.0)}, "(0, inf)", "min_step_size"),
    (P.rprop, "step_sizes[1]", {"step_sizes": (1e-6, -1.0)}, "(0, inf)", "max_step_size"),
    (P.rprop, "step_sizes[0]", {"step_sizes": (1.0, 0.5)}, "step_sizes[1]", "min_step_size"),
]


@pytest.mark.parametrize(
    ("preset", "name", "kwargs", "interval", "internal"),
    BAD,
    ids=[f"{p.__name__}-{n}-{i}" for i, (p, n, _, _, _) in enumerate(BAD)],
)
def test_bad_value_names_torchs_argument(
    preset: Callable[..., Any],
    name: str,
    kwargs: dict[str, Any],
    interval: str,
    internal: str | None,
) -> None:
    with pytest.raises(ValueError) as info:
        preset(**kwargs)
    message = str(info.value)
    assert f"`{name}`" in message
    assert interval in message
    if internal is not None:
        assert f"`{internal}`" not in message


def test_table_covers_every_numeric_argument() -> None:
    """Every argument of every preset that takes a number appears in the table."""
    import inspect

    covered = {(p.__name__, n.split("[")[0]) for p, n, _, _, _ in BAD}
    for name in P.__all__:
        for param in inspect.signature(getattr(P, name)).parameters.values():
            if isinstance(param.default, bool):
                continue  # flags (maximize, centered, nesterov, amsgrad)
            assert (name, param.name) in covered, (name, param.name)


@pytest.mark.parametrize(
    "build",
    [
        lambda: P.rmsprop(alpha=0.0, eps=0.0, momentum=1.0, weight_decay=0.0),
        lambda: P.sgd(momentum=1.0, dampening=1.0),
        lambda: P.sgd(momentum=0, dampening=1.0),  # no buffer: dampening unused
        lambda: P.adadelta(rho=0.0, eps=1e-30),
        lambda: P.rprop(step_sizes=(0.5, 0.5)),
        lambda: P.adam(betas=(0.0, 0.0), eps=0.0),
    ],
)
def test_edges_of_the_documented_ranges_are_accepted(build: Callable[[], Any]) -> None:
    assert isinstance(build(), optax.GradientTransformation)
