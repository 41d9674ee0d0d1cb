"""The step of a group of leaves as one JAX primitive, ``rmsjax_ffi_call``, with two rules.

:func:`bind` stands for a group's step: a *kernel* rule (the native kernel's FFI calls) and a
*pure* rule (the pure-JAX chain), both functions of the same operands with the same results.
Until XLA lowering the primitive is the step; then the lowering picks the rule per platform:
the kernel on CPU, the pure-JAX chain elsewhere (only the platforms lowered for are ever
traced). ``vmap`` runs the pure rule under vmap, differentiation takes the pure rule's JVP,
and outside ``jit`` the kernel runs eagerly (per platform, ``jax.lax.platform_dependent``, in a
process that also has an accelerator: see :func:`accelerator_present`).

A primitive rather than ``jax.custom_jvp`` / ``custom_vmap`` / ``lax.platform_dependent``
wrappers: those trace the kernel path once more per wrapper over all the step's arrays, which
was most of the fused step's trace time on a tree of many leaves. The name contains
``ffi_call`` (the documented way to see that a step uses the kernel: look for it in
``jax.make_jaxpr(opt.step)``).

Test hook: :func:`accelerator_present` (monkeypatch it here to emulate a process with a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["Call", "accelerator_present", "bind", "fused_step_p"]


@functools.cache
def accelerator_present() -> bool:
    """True when this process can also run on a non-CPU backend (GPU, TPU, ...).

    Then a fused step called outside ``jit`` picks its path per platform
    (``jax.lax.platform_dependent``: the kernel on CPU, the pure-JAX chain elsewhere), and a
    missing kernel is not warned about. Under ``jit`` the choice is made while lowering, for
    the platforms lowered for (see ``fused_step_p``).
    """
    for name in ("gpu", "tpu", "METAL"):
        try:
            if jax.devices(name):
                return True
        except Exception:  # unknown or uninitialisable backend: not present
            continue
    return False


class Call:
    """The static part of one ``fused_step_p``: the kernel and the pure-JAX rule (both
    functions of the same operand tree, with the same result tree), how the flat operands
    and results are structured, and which operand each result replaces (same shape and
    dtype). Hashed and compared by identity."""

    __slots__ = ("in_tree", "kernel", "label", "out_index", "out_tree", "pure")

    def __init__(
        self,
        kernel: Callable[..., Any],
        pure: Callable[..., Any],
        in_tree: Any,
        out_tree: Any,
        out_index: tuple[int, ...],
        label: str,
    ):
        self.kernel, self.pure = kernel, pure
        self.in_tree, self.out_tree = in_tree, out_tree
        self.out_index, self.label = out_index, label

    def __repr__(self) -> str:
        return self.label

    def flat(self, fn: Callable[..., Any], *flat: Any) -> list[Any]:
        """``fn`` (the kernel or the pure rule) on flat operands, with flat results."""
        leaves, tree = jax.tree.flatten(fn(*jax.tree.unflatten(self.in_tree, flat)))
        if tree != self.out_tree:
            raise AssertionError(f"fused step results {tree}, expected {self.out_tree}")
        return leaves


fused_step_p = Primitive("rmsjax_ffi_call")
fused_step_p.multiple_results = True


def bind(
    kernel: Callable[..., Any],
    pure: Callable[..., Any],
    args: tuple[Any, ...],
    like: Any,
    label: str,
) -> Any:
    """``kernel(*args)`` (or ``pure(*args)``, as the platform and transformation decide) as one
    ``fused_step_p``.

    Args:
      kernel: the kernel rule.
      pure: the pure-JAX rule; same arguments and results as ``kernel``.
      args: the rules' arguments (a tuple of pytrees).
      like: a pytree of the same structure as the rules' results, whose every leaf IS one of
        the leaves of ``args`` (the operand that result replaces: same shape and dtype).
      label: how the call is shown in a jaxpr.
    """
    flat, in_tree = jax.tree.flatten(args)
    like_leaves, out_tree = jax.tree.flatten(like)
    position = {id(x): i for i, x in enumerate(flat)}
    out_index = tuple(position[id(x)] for x in like_leaves)
    call = Call(kernel, pure, in_tree, out_tree, out_index, label)
    return jax.tree.unflatten(out_tree, fused_step_p.bind(*flat, call=call))


def _impl(*flat: Any, call: Call) -> list[Any]:
    # eager (outside jit): the kernel's FFI calls run one by one, as ops, on CPU
    if accelerator_present():
        return jax.lax.platform_dependent(
            *flat,
            cpu=functools.partial(call.flat, call.kernel),
            default=functools.partial(call.flat, call.pure),
        )
    return call.flat(call.kernel, *flat)


def _abstract_eval(*avals: Any, call: Call) -> list[Any]:
    out = [avals[i] for i in call.out_index]
    return [a.update(weak_type=False) if a.weak_type else a for a in out]


def _lower_kernel(*flat: Any, call: Call) -> list[Any]:
    return call.flat(call.kernel, *flat)


def _lower_pure(*flat: Any, call: Call) -> list[Any]:
    return call.flat(call.pure, *flat)


def _jvp(primals: Sequence[Any], tangents: Sequence[Any], *, call: Call) -> Any:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(call.flat, call.pure), tuple(primals), tuple(tangents))


def _batch(args: Sequence[Any], dims: Sequence[Any], *, call: Call) -> Any:
    out = jax.vmap(functools.partial(call.flat, call.pure), in_axes=tuple(dims))(*args)
    return out, [0] * len(out)


fused_step_p.def_impl(_impl)
fused_step_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(fused_step_p, mlir.lower_fun(_lower_kernel, multiple_results=True), "cpu")
mlir.register_lowering(fused_step_p, mlir.lower_fun(_lower_pure, multiple_results=True))
ad.primitive_jvps[fused_step_p] = _jvp
batching.primitive_batchers[fused_step_p] = _batch
