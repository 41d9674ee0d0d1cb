"""Helpers shared by the framework presets (not public)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.validation import check_learning_rate

__all__ = ["betas_pair", "descend", "is_static_zero", "pair", "sign_flip"]


def is_static_zero(value: Any) -> bool:
    """True for a plain Python ``0``/``0.0``: then an optional buffer or term is left out.

    Only literal Python numbers count. Arrays and traced values (what
    ``optax.inject_hyperparams`` passes) always keep the buffer, so the state structure never
    depends on a traced value; the numbers are the same either way.
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def pair(name: str, value: Any, form: str) -> tuple[Any, Any]:
    """The two entries of a preset's pair argument (torch's ``betas``, ``etas``, ...).

    A pair is a tuple or list of two entries, or an array of shape ``(2,)`` (as
    ``optax.inject_hyperparams`` passes an injected pair); the transformations then check each
    entry. ``form`` says what the entries are, e.g. ``"(beta1, beta2)"``.

    Raises:
      TypeError: ``value`` is not a sequence (a number, ``None``, a string, a 0-d array).
      ValueError: ``value`` is a sequence of another length, or an array of another shape.
    """
    expected = f"`{name}` must be a pair {form}"
    if isinstance(value, np.ndarray | jax.Array) and value.ndim > 0:
        if value.shape != (2,):
            raise ValueError(f"{expected}, got an array of shape {value.shape}.")
    elif isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{expected}, got {value!r} of type {type(value).__name__}.")
    elif len(value) != 2:
        raise ValueError(f"{expected}, got {value!r} of length {len(value)}.")
    return value[0], value[1]


def betas_pair(betas: Any) -> tuple[Any, Any]:
    """``(beta1, beta2)`` from an Adam preset's ``betas`` (see :func:`pair`)."""
    return pair("betas", betas, "(beta1, beta2)")


def sign_flip(maximize: bool) -> list[optax.GradientTransformation]:
    """``[scale(-1)]`` when ``maximize`` (the raw gradient is negated first), else ``[]``."""
    return [T.scale(-1.0)] if maximize else []


def descend(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """``scale_by_learning_rate(learning_rate)`` for a preset, whose learning rate is required.

    optax's ``scale_by_learning_rate(None)`` is the identity (no sign flip: the optimizer would
    climb the gradient); a preset's ``None`` is a mistake, so it raises like the optimizers do.
    """
    check_learning_rate("learning_rate", learning_rate)
    return T.scale_by_learning_rate(learning_rate)
