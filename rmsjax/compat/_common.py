"""Helpers shared by the framework presets (not public)."""

from __future__ import annotations

from typing import Any

import optax

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.validation import check_learning_rate

__all__ = ["descend", "is_static_zero", "sign_flip"]


def is_static_zero(value: Any) -> bool:
    """True for a plain Python ``0``/``0.0``: then an optional buffer or term is left out.

    Only literal Python numbers count. Arrays and traced values (what
    ``optax.inject_hyperparams`` passes) always keep the buffer, so the state structure never
    depends on a traced value; the numbers are the same either way.
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


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
