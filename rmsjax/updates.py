"""Applying updates to parameters."""

from __future__ import annotations

from typing import Any

from rmsjax.tree import map_rule

__all__ = ["apply_updates"]


def apply_updates(params: Any, updates: Any) -> Any:
    r"""Return :math:`\theta + u` leaf by leaf, in each parameter's own dtype.

    ``None`` leaves (in either tree) stay ``None``. The update tree must have the params'
    structure; if not, the error shows both. Same as ``optax.apply_updates``, whose sum is
    likewise cast back to the parameter dtype.

    Args:
      params: the parameter tree :math:`\theta`.
      updates: a tree with the params' structure (``None`` leaves allowed): the output of an
        optimizer's ``update``.
    """

    # Lift "p + u" with the shared helper: the params play the part of the state tree, so a
    # structure mismatch is reported with both trees and a None update keeps the parameter.
    _, (new_params,) = map_rule(lambda u, p: (u, p + u), updates, (params,), what="params")
    return new_params
