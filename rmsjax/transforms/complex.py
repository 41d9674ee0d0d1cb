r"""Complex parameters as pairs of real ones: :func:`split_real_and_imaginary` (PyTorch's
``view_as_real`` convention)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from rmsjax.tree import check_state

__all__ = [
    "SplitRealAndImaginaryState",
    "split_real_and_imaginary",
]

SplitRealAndImaginaryState = optax.contrib.SplitRealAndImaginaryState
"""State of :func:`split_real_and_imaginary`:
``optax.contrib.SplitRealAndImaginaryState(inner_state)``."""

# A complex leaf split in two; optax's own pair type, so that the inner state of a complex
# parameter has optax's layout too (optax defines it without exporting it).
try:
    from optax.contrib._complex_valued import SplitRealAndImaginaryArrays as _RealImag
except ImportError:  # pragma: no cover - an optax without it has no such layout to match

    class _RealImag(NamedTuple):  # type: ignore[no-redef]
        """A complex leaf split into its real and imaginary parts (two real leaves)."""

        real: jax.Array
        imaginary: jax.Array


def _split(x: Any) -> Any:
    if x is not None and jnp.iscomplexobj(x):
        return _RealImag(jnp.real(x), jnp.imag(x))
    return x


def _merge(x: Any) -> Any:
    if isinstance(x, _RealImag):
        return jax.lax.complex(x.real, x.imaginary)
    return x


def split_real_and_imaginary(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    r"""Run ``inner`` on the real and imaginary parts of complex leaves as separate real leaves.

    A complex leaf :math:`z = x + iy` (update and parameter alike) is given to ``inner`` as two
    real leaves :math:`x` and :math:`y`, and the two resulting updates are joined back into
    :math:`u_x + i\,u_y`. Real leaves pass through unchanged. Second moments therefore become
    per component, :math:`\nu_x \leftarrow \rho\nu_x + (1-\rho)x^2` and likewise for
    :math:`y`, instead of the modulus :math:`\rho\nu + (1-\rho)|z|^2` that rmsjax and optax
    use for complex leaves. This is what every ``torch.optim`` optimizer except SGD does
    (``torch.view_as_real``).

    Gradient convention: PyTorch's ``.grad`` of a real loss of a complex parameter is the
    conjugate of ``jax.grad``'s; as with optax, pass ``jnp.conj(jax.grad(loss)(params))`` to
    descend.

    Same numbers, name and state layout as ``optax.contrib.split_real_and_imaginary``
    (``optax.contrib.SplitRealAndImaginaryState(inner_state)``, complex leaves of the inner
    state split into optax's real/imaginary pairs); the merge is exact (``lax.complex``) and
    ``None`` leaves pass through.

    Args:
      inner: any gradient transformation; it only ever sees real leaves.
    """

    def init_fn(params: Any) -> Any:
        return SplitRealAndImaginaryState(inner.init(jax.tree.map(_split, params)))

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        check_state(state, SplitRealAndImaginaryState, "split_real_and_imaginary")
        if not any(jnp.iscomplexobj(x) for x in jax.tree.leaves((updates, params))):
            # nothing to split: the same trees go through (so a recording sees them, see
            # rmsjax.stages)
            out, inner_state = inner.update(updates, state.inner_state, params)
            return out, SplitRealAndImaginaryState(inner_state)
        split_params = None if params is None else jax.tree.map(_split, params)
        out, inner_state = inner.update(
            jax.tree.map(_split, updates), state.inner_state, split_params
        )
        out = jax.tree.map(_merge, out, is_leaf=lambda x: isinstance(x, _RealImag))
        return out, SplitRealAndImaginaryState(inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
