"""Helpers shared by the framework presets (not public)."""

from __future__ import annotations

from typing import Any

import optax

from rmsjax import transforms as T
from rmsjax.validation import check_in_range

__all__ = ["check_lr", "is_static_zero", "sign_flip"]


def is_static_zero(value: Any) -> bool:
    """True for a plain Python ``0``/``0.0``: then an optional buffer or term is left out.

    Only literal Python numbers count. Arrays and traced values (what
    ``optax.inject_hyperparams`` passes) always keep the buffer, so the state structure never
    depends on a traced value; the numbers are the same either way.
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def check_lr(name: str, value: Any) -> None:
    """A learning rate must be >= 0 (a schedule is not checked)."""
    check_in_range(name, value, low=0.0, hint="Pass a non-negative step size or a schedule.")


def sign_flip(maximize: bool) -> list[optax.GradientTransformation]:
    """``[scale(-1)]`` when ``maximize`` (the raw gradient is negated first), else ``[]``."""
    return [T.scale(-1.0)] if maximize else []
