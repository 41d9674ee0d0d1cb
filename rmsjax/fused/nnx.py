r"""The fused step for Flax NNX: an ``nnx.Optimizer`` whose ``update`` runs ``step``.

``nnx.Optimizer.update(model, grads)`` calls ``tx.update`` and then ``optax.apply_updates``, so
a model trained through it never reaches the fused ``step`` of a :mod:`rmsjax.fused`
optimizer. :class:`Optimizer` is the same class with one change: ``update`` runs
``tx.step(params, grads, opt_state)`` (the native kernel on CPU, see :mod:`rmsjax.fused`) and
writes the new parameters and state back into the model and the optimizer.

.. code-block:: python

  from flax import nnx
  import rmsjax

  optimizer = rmsjax.fused.nnx.Optimizer(
      model, rmsjax.fused.rmsprop(1e-3, centered=True, momentum=0.9), wrt=nnx.Param
  )

  @nnx.jit(donate_argnums=(0, 1))  # donate model and optimizer: updated in place
  def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads)
      return loss

Everything else is ``nnx.Optimizer``'s: the constructor, ``wrt``, the ``step`` counter and the
optimizer state (an ``nnx.Optimizer`` over the protocol optimizer ``rmsjax.rmsprop(...)`` has
the same state, so checkpoints move between the two). The parameters after each update equal
those of ``nnx.Optimizer(model, rmsjax.rmsprop(...), wrt=...)`` to float32 rounding.

Flax is an optional dependency: ``import rmsjax`` and ``import rmsjax.fused`` never import it;
``rmsjax.fused.nnx`` does, on first access.

Differences from ``nnx.Optimizer``:
  * ``tx`` must be a :class:`rmsjax.fused.FusedOptimizer` (``rmsjax.fused.rmsprop(...)`` etc.,
    or :func:`rmsjax.fused.inject_hyperparams`); anything else raises ``TypeError``.
  * ``update`` returns ``None``: the fused step never forms the updates ``new - old`` (that
    would cost the extra pass over memory it exists to avoid), and it takes no extra keyword
    arguments (``TypeError``).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from rmsjax.fused.step import FusedOptimizer

__all__ = ["Optimizer"]


class Optimizer(nnx.Optimizer):
    """``nnx.Optimizer`` whose ``update`` runs the fused ``step`` of a fused optimizer.

    Args:
      model: the NNX module to train.
      tx: a :class:`rmsjax.fused.FusedOptimizer` (e.g. ``rmsjax.fused.adamw(1e-3)``).
      wrt: which variables are trained (as for ``nnx.Optimizer``; e.g. ``nnx.Param``); the
        gradients passed to :meth:`update` must be taken with the same filter.
      **kwargs: passed on to ``nnx.Optimizer`` (e.g. ``graph=``).

    Raises:
      TypeError: ``tx`` is not a fused optimizer.
    """

    def __init__(self, model: Any, tx: FusedOptimizer, *, wrt: Any, **kwargs: Any) -> None:
        if not isinstance(tx, FusedOptimizer):
            raise TypeError(
                "rmsjax.fused.nnx.Optimizer needs a fused optimizer (rmsjax.fused.rmsprop(...), "
                f"adam, adamw, sgd or rmsjax.fused.inject_hyperparams), got {type(tx).__name__}; "
                "for any other optax transformation use flax.nnx.Optimizer."
            )
        super().__init__(model, tx, wrt=wrt, **kwargs)

    def update(self, model: Any, grads: Any, /, **kwargs: Any) -> None:
        """One fused step: ``params, opt_state = tx.step(params, grads, opt_state)``.

        The model's ``wrt`` variables and the optimizer state are updated in place (as NNX
        objects; donate them to ``nnx.jit`` so that XLA also reuses their buffers) and the
        ``step`` counter is incremented. Same arguments as ``nnx.Optimizer.update``, without
        extra keyword arguments; returns ``None``.
        """
        if kwargs:
            raise TypeError(
                f"the fused step takes no extra arguments, got {sorted(kwargs)}; use "
                "flax.nnx.Optimizer with a transformation that needs them."
            )
        graph = getattr(self, "graph", None)
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=graph))
        grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=graph))
        state = nnx.as_pure(self.opt_state)
        new_params, new_state = self.tx.step(params, grad_arrays, state)
        nnx.update(model, new_params)
        nnx.update(self.opt_state, nnx.state(new_state, graph=graph))
        self.step[...] += 1
