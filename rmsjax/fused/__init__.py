r"""Fused optimizer steps: update AND apply, for every leaf, in one pass over memory.

The optax protocol splits a step in two: ``update`` turns gradients into updates (writing the
new state), then ``apply_updates`` adds them to the parameters. On CPU, XLA compiles that into
several loops per leaf, so the step moves more bytes than it must, and a tree of many leaves
compiles one fusion per leaf and rule. An optimizer from this module adds a third entry point,

.. code-block:: python

  opt = rmsjax.fused.rmsprop(learning_rate=1e-3, centered=True, momentum=0.9)
  state = opt.init(params)
  params, state = opt.step(params, grads, state)   # == update + apply_updates

which on CPU runs the whole step, for the float32 and bfloat16 leaves of the tree (with float32
or 8-bit state), in a native kernel (:mod:`rmsjax.native`; one call per few leaves) that reads
each parameter, gradient and state element once and writes the new values in place (donate
``params`` and ``state`` to ``jax.jit`` so XLA can reuse the buffers), on all the threads of
XLA's CPU thread pool.

Each fused optimizer is DERIVED from the optax-protocol optimizer of the same name:
``rmsjax.fused.rmsprop = fuse(rmsjax.rmsprop)``, and likewise ``adam``, ``adamw`` and ``sgd``.
:func:`fuse` keeps the factory's signature (plus the keyword-only ``backend`` and
``min_native_size``), its validation and its ``init``/``update``, which are exactly the
protocol optimizer's, so the state is the same and the two entry points can be mixed.

Fusion goes by what a chain does, not by its name: :func:`fuse` takes ANY optimizer factory or
transformation, and its ``step`` runs the kernel wherever the chain's rules are the kernel's.
At each step's trace, the transformations the kernel can run record their rule and arguments
instead of computing (:mod:`rmsjax.stages`), and the recorded sequence is matched to a kernel
kind (:mod:`rmsjax.fused.plans`): ``optax.chain(rmsjax.scale_by_rms(), rmsjax.scale(-1e-3))``,
``rmsjax.compat.pytorch.rmsprop(lr=1e-3)`` or ``rmsjax.compat.keras.rmsprop(momentum=0.9)``
fuse like ``rmsjax.rmsprop``; a chain with a transformation that changes the updates between
the kernel's rules (``optax.clip``, a ``mask``, a rule the kernel does not have) runs the
pure-JAX chain, with the same numbers.

Numbers: the kernel performs the operations of the pure-JAX rules in the same order, on every
input: NaN and Inf land where ``update`` + ``apply_updates`` puts them (a NaN gradient makes
the parameter NaN, it is never hidden), zero divisors give 0 as in the pure rules, and finite
results agree to float32 rounding (a few units in the last place: the two compilers may place
fused multiply-adds differently). Hyperparameters, schedules included, are evaluated by JAX
with the transformations' own functions and passed to the kernel as a float32 operand: traced
values, schedules and :func:`inject_hyperparams` work and never recompile.

When the pure-JAX path runs instead (same numbers, the XLA-compiled chain):

* ``backend="jax"``, ``RMSJAX_NATIVE=0``, or the kernel could not be built
  (``rmsjax.native.available()`` is False; ``rmsjax.native.status()`` says why). In the last
  case, with ``backend="auto"``, the first step that would have used the kernel issues a
  :class:`NativeFallbackWarning` (once per process);
* on GPU/TPU (chosen per platform while lowering: the kernel's leaves are one primitive,
  ``rmsjax_ffi_call``, that lowers to the kernel's FFI calls for CPU and to the pure-JAX chain
  for any other platform, so ``jax.export`` for GPU/TPU works from a CPU-only process too);
* when more than one device is visible, or an input is sharded over several devices (the
  kernel has no partitioning rule, so the elementwise XLA program is kept);
* under ``jax.vmap`` (the primitive's batching rule), and to differentiate the step (its
  JVP rule: the tangents are the pure-JAX rule's);
* for leaves whose parameters are not float32 or bfloat16 (float16/float64/complex, or a
  gradient of another dtype), whose state the kernel does not store (a float dtype other than
  float32, such as ``mu_dtype=jnp.bfloat16``; 4-bit codes, the bitsandbytes or torchao codecs,
  stochastic rounding; 8-bit state is taken in rmsjax's own codec), leaves whose gradient is
  ``None``, leaves of fewer than ``min_native_size``
  elements (default :data:`MIN_NATIVE_SIZE` = 16384: for biases and norms the compiled chain is
  faster). Such leaves go through the pure-JAX chain while the other leaves still use the
  kernel;
* for every leaf when the chain's rules are not a kernel kind's (see above).

``backend="native"`` raises ``RuntimeError`` at the first step when the kernel is unavailable
instead of falling back. To see which path a step takes, look for ``ffi_call`` (the primitive
``rmsjax_ffi_call``) in ``jax.make_jaxpr(opt.step)(params, grads, state)``.

Flax NNX: ``nnx.Optimizer.update`` calls ``update`` + ``apply_updates``, never ``step``;
:class:`rmsjax.fused.nnx.Optimizer` is an ``nnx.Optimizer`` whose ``update`` runs the fused
step (``rmsjax.fused.nnx`` imports flax when first accessed; ``rmsjax.fused`` itself does not).

Modules: :mod:`rmsjax.fused.plans` (which kernel call runs a recorded chain),
:mod:`rmsjax.fused.selection` (which leaves the kernel takes, in which groups),
:mod:`rmsjax.fused.rules` (a group's kernel and pure-JAX rules),
:mod:`rmsjax.fused.primitive` (the ``rmsjax_ffi_call`` primitive that picks between them),
:mod:`rmsjax.fused.step` (the step and its fallbacks), :mod:`rmsjax.fused.nnx` (Flax NNX);
the kernel's interface (operand table, codec operands, FFI call, loader) is
:mod:`rmsjax._native`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import optax
from jax.typing import DTypeLike

from rmsjax import optimizers as O
from rmsjax.fused.step import (
    MIN_NATIVE_SIZE,
    FusedOptimizer,
    NativeFallbackWarning,
    build,
)

__all__ = [
    "MIN_NATIVE_SIZE",
    "FusedOptimizer",
    "NativeFallbackWarning",
    "adam",
    "adamw",
    "fuse",
    "fused",
    "inject_hyperparams",
    "rmsprop",
    "sgd",
]

# The keyword-only arguments fuse() adds to a factory (static: never hyperparameters).
_FUSE_KEYWORDS = ("backend", "min_native_size")

_FUSED_DOC = """\
:func:`{name}` with a fused ``step``; same arguments, validation, state and numbers.

``init`` and ``update`` are those of ``{name}(...)``; ``step(params, grads, state)``
equals ``update`` followed by :func:`rmsjax.apply_updates` and runs the native CPU kernel where
it can (see :mod:`rmsjax.fused`). Made by ``rmsjax.fused.fuse({name})``.

Additional keyword-only arguments:
  backend: ``"auto"`` (default: the native kernel on CPU when available, else pure JAX, with a
    :class:`~rmsjax.fused.NativeFallbackWarning` once when the kernel could not be built),
    ``"native"`` (raise ``RuntimeError`` at the first step if the kernel is unavailable) or
    ``"jax"`` (never the kernel).
  min_native_size: leaves with fewer elements take the compiled pure-JAX rule (default
    16384, ``rmsjax.fused.MIN_NATIVE_SIZE``); 0 sends every float32 leaf to the kernel.

Differences from optax: those of :func:`{name}`; optax has no fused step.

The protocol optimizer :func:`{name}`:

{doc}
"""


def fuse(
    factory: Callable[..., optax.GradientTransformation],
) -> Callable[..., FusedOptimizer]:
    """A fused optimizer factory derived from an optax-protocol optimizer factory.

    ``fuse(rmsjax.rmsprop)`` takes ``rmsjax.rmsprop``'s arguments (same names, defaults,
    validation) plus the keyword-only ``backend`` and ``min_native_size``, and returns a
    :class:`FusedOptimizer` whose ``init`` and ``update`` are exactly
    ``rmsjax.rmsprop(...)``'s and whose ``step`` runs the native kernel where the chain's rules
    are the kernel's (see the module docstring). For one transformation rather than a factory,
    use :func:`fused`.

    Args:
      factory: any callable returning an optax ``GradientTransformation`` (``rmsjax.adamw``,
        ``rmsjax.compat.pytorch.adam``, a function of your own that returns an
        ``optax.chain``).

    Raises:
      TypeError: ``factory`` is not callable, or already has arguments named ``backend`` or
        ``min_native_size``.
    """
    if not callable(factory) or isinstance(factory, optax.GradientTransformation):
        raise TypeError(
            f"`factory` must be a callable returning an optax GradientTransformation (for a "
            f"transformation itself use rmsjax.fused.fused), got {type(factory).__name__}."
        )
    signature = inspect.signature(factory)
    clash = set(_FUSE_KEYWORDS) & set(signature.parameters)
    if clash:
        raise TypeError(f"{factory.__qualname__} already has arguments named {sorted(clash)}")

    @functools.wraps(factory)
    def fused_factory(
        *args: Any, backend: str = "auto", min_native_size: int = MIN_NATIVE_SIZE, **kwargs: Any
    ) -> FusedOptimizer:
        tx = factory(*args, **kwargs)  # the protocol optimizer validates its own arguments
        return build(tx, backend=backend, min_native_size=min_native_size)

    params = list(signature.parameters.values())
    extra = [
        inspect.Parameter(
            "backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=str
        ),
        inspect.Parameter(
            "min_native_size",
            inspect.Parameter.KEYWORD_ONLY,
            default=MIN_NATIVE_SIZE,
            annotation=int,
        ),
    ]
    at = next(
        (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params)
    )
    fused_factory.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*params[:at], *extra, *params[at:]], return_annotation=FusedOptimizer
    )
    name = getattr(factory, "__name__", "optimizer")
    module = getattr(factory, "__module__", "") or ""
    public = f"rmsjax.{name}" if module == O.__name__ else f"{module}.{name}"
    doc = inspect.cleandoc(factory.__doc__ or "")
    fused_factory.__doc__ = _FUSED_DOC.format(name=public, doc=doc)
    fused_factory.__module__ = __name__
    fused_factory.__qualname__ = name
    return fused_factory


def fused(
    tx: optax.GradientTransformation,
    *,
    backend: str = "auto",
    min_native_size: int = MIN_NATIVE_SIZE,
) -> FusedOptimizer:
    """``tx`` with a fused ``step``: a :class:`FusedOptimizer` whose ``init`` and ``update``
    are ``tx``'s and whose ``step(params, grads, state)`` equals ``update`` +
    :func:`rmsjax.apply_updates`, running the native kernel where ``tx``'s rules are the
    kernel's (see the module docstring).

    Args:
      tx: any optax ``GradientTransformation`` (an ``optax.chain`` of rmsjax
        transformations, a ``rmsjax.compat`` preset, ``optax.inject_hyperparams(...)``).
      backend: ``"auto"``, ``"native"`` or ``"jax"``, as for the fused factories.
      min_native_size: leaves with fewer elements take the compiled pure-JAX rule.

    Example::

      opt = rmsjax.fused.fused(optax.chain(rmsjax.scale_by_rms(), rmsjax.scale(-1e-3)))
      params, state = opt.step(params, grads, opt.init(params))
    """
    return build(tx, backend=backend, min_native_size=min_native_size)


rmsprop = fuse(O.rmsprop)
adam = fuse(O.adam)
adamw = fuse(O.adamw)
sgd = fuse(O.sgd)


def inject_hyperparams(
    factory: Callable[..., FusedOptimizer],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: DTypeLike | None = None,
) -> Callable[..., FusedOptimizer]:
    """``optax.inject_hyperparams`` for a fused factory: the state holds the hyperparameters.

    ``inject_hyperparams(rmsjax.fused.rmsprop)(learning_rate=0.1)`` returns a
    :class:`FusedOptimizer` whose ``init``/``update`` are exactly
    ``optax.inject_hyperparams(rmsjax.fused.rmsprop)(...)`` and whose ``step`` does the same
    thing fused: schedules are evaluated and ``state.hyperparams`` is read by optax's own code,
    then the fused step of the inner optimizer runs with those (traced) values. Arguments as
    for ``optax.inject_hyperparams``; ``backend`` and ``min_native_size`` are always static.
    """
    static = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    static += tuple(k for k in _FUSE_KEYWORDS if k not in static)
    protocol = optax.inject_hyperparams(factory, static, hyperparam_dtype)

    @functools.wraps(factory)
    def as_step(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        # A transformation whose "update" is the fused step (new params in place of updates),
        # so optax's wrapper can manage the hyperparameters around it.
        opt = factory(*args, **kwargs)

        def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
            return opt.step(params, grads, state)

        return optax.GradientTransformation(opt.init, update)

    stepping = optax.inject_hyperparams(as_step, static, hyperparam_dtype)

    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> FusedOptimizer:
        outer = protocol(*args, **kwargs)
        inner = stepping(*args, **kwargs)

        def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
            new_params, new_state = inner.update(grads, state, params)
            return new_params, new_state

        return FusedOptimizer(outer.init, outer.update, step)

    return wrapped


def __getattr__(name: str) -> Any:
    # rmsjax.fused.nnx needs flax, an optional dependency: imported on first access only.
    if name == "nnx":
        return importlib.import_module("rmsjax.fused.nnx")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
