"""What a transformation is, as the fused step sees it: the stages of a recorded update.

A transformation built by :func:`rmsjax.moments.moment_transform` with a ``stage`` name is one
the native kernel can run (its rule is one of the kernel's). Inside :func:`recording`, its
``update`` computes nothing: it appends a :class:`Stage` (its name, the rule's arguments at
this step, its state, and how to apply its rule) and returns the updates and the state it was
given, unchanged. So calling any composition of transformations (``optax.chain``, the optimizers,
the ``rmsjax.compat`` presets, a user's own chain) under :func:`recording` lists the rules it
applies, in order, without knowing how it was built; a transformation that is not a stage
computes as usual and returns a new tree of updates, which the recorder sees (the updates a
stage receives are no longer the ones the chain was given). :mod:`rmsjax.fused` plans the
kernel call from such a list.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

__all__ = ["Recording", "Stage", "record", "recording"]


class Stage(NamedTuple):
    """One transformation met in a recorded update.

    Attributes:
      name: what rule it is (``"rms"``, ``"centered_rms"``, ``"adam"``, ``"trace"``,
        ``"scale"``, ``"add_decayed_weights"``, ...; the names
        :mod:`rmsjax.fused.plans` knows).
      args: the rule's keyword arguments at this step (hyperparameters, bias corrections,
        schedule values: numbers or traced arrays).
      state: the transformation's state before the step.
      moments: the names of its moment fields that the rule takes, in the rule's order.
      updates: the updates it was given.
      apply: ``apply(updates, moments, params, args) -> (updates, new_moments)``: its rule
        applied leaf by leaf (``moments`` a tuple of trees in the order of ``moments``), exactly
        as its ``update`` applies it. It closes over no array, so it can run in any trace.
    """

    name: str
    args: Mapping[str, Any]
    state: Any
    moments: tuple[str, ...]
    updates: Any
    apply: Callable[..., tuple[Any, tuple[Any, ...]]]


class Recording:
    """The stages recorded so far (see :func:`recording`)."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []


_ACTIVE: contextvars.ContextVar[Recording | None] = contextvars.ContextVar(
    "rmsjax_recording", default=None
)


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Within this context, stage transformations record themselves instead of computing."""
    rec = Recording()
    token = _ACTIVE.set(rec)
    try:
        yield rec
    finally:
        _ACTIVE.reset(token)


def record(stage: Stage) -> bool:
    """Record ``stage`` if a :func:`recording` is active; whether it was recorded (then the
    transformation must return its updates and state unchanged)."""
    rec = _ACTIVE.get()
    if rec is None:
        return False
    rec.stages.append(stage)
    return True
