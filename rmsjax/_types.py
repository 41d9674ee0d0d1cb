"""Type aliases of the public API (schedules and hyperparameters)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.typing import ArrayLike

__all__ = ["ScalarOrSchedule", "Schedule"]

Schedule = Callable[[jax.Array], ArrayLike]
"""A learning-rate (or other hyperparameter) schedule: ``count -> value``, jit-safe."""

ScalarOrSchedule = float | jax.Array | Schedule
"""A hyperparameter given either as a value or as a :data:`Schedule`."""
