"""Type aliases of the public API (schedules and hyperparameters)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["HALF_FLOATS", "ScalarOrSchedule", "Schedule"]

Schedule = Callable[[jax.Array], ArrayLike]
"""A learning-rate (or other hyperparameter) schedule: ``count -> value``, jit-safe."""

ScalarOrSchedule = float | jax.Array | Schedule
"""A hyperparameter given either as a value or as a :data:`Schedule`."""

HALF_FLOATS: tuple[jnp.dtype, ...] = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""The half-precision float dtypes: whose moments are promoted to float32 by default, and
which stochastic rounding targets."""
