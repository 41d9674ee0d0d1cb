"""The framework-variant transformations (PyTorch's, Keras' and optax's forms): against optax
live where optax has the same rule, against NumPy statements of the update equations where it
has not."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
import rmsjax as V
from tests.common import enable_x64

STEPS = 12


def grads_seq(dtype: Any = np.float32, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """A gradient sequence (steps, 5) whose magnitude shrinks then grows (so AMSGrad's max
    and Rprop-like effects show)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(STEPS, 5)) * np.linspace(2.0, 0.2, STEPS)[:, None]
    if np.issubdtype(dtype, np.complexfloating):
        g = g + 1j * rng.normal(size=(STEPS, 5))
    return (scale * g).astype(dtype)


def outputs(opt: Any, grads: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """The updates of ``opt`` for each gradient (params fixed), in one jitted scan."""
    p0 = jnp.asarray(params if params is not None else np.ones(grads.shape[1], grads.dtype))

    @jax.jit
    def run(gs: jax.Array) -> jax.Array:
        def step(s: Any, g: jax.Array) -> tuple[Any, jax.Array]:
            u, s = opt.update(g, s, p0)
            return s, u

        return jax.lax.scan(step, opt.init(p0), gs)[1]

    return np.asarray(run(jnp.asarray(grads)))


def close(a: np.ndarray, b: np.ndarray, rtol: float = 2e-6) -> None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# --------------------------------------------------------------------------------------------
# split_real_and_imaginary
# --------------------------------------------------------------------------------------------


def test_split_real_and_imaginary_matches_optax_contrib() -> None:
    g = grads_seq(np.complex64)
    ours = outputs(V.split_real_and_imaginary(rmsjax.scale_by_rms(decay=0.9)), g)
    theirs = outputs(optax.contrib.split_real_and_imaginary(optax.scale_by_rms(decay=0.9)), g)
    close(ours, theirs)


def test_split_real_and_imaginary_is_per_component_and_passes_real_and_none() -> None:
    g = grads_seq(np.complex64)
    ours = outputs(V.split_real_and_imaginary(rmsjax.scale_by_rms(decay=0.9)), g)
    re = outputs(rmsjax.scale_by_rms(decay=0.9), g.real.copy())
    im = outputs(rmsjax.scale_by_rms(decay=0.9), g.imag.copy())
    close(ours.real, re)
    close(ours.imag, im)
    # Differs from the modulus-based moments rmsjax/optax use for complex leaves.
    assert np.abs(ours - outputs(rmsjax.scale_by_rms(decay=0.9), g)).max() > 1e-2
    opt = V.split_real_and_imaginary(rmsjax.scale_by_rms())
    tree = {"r": jnp.ones(3), "n": None, "c": jnp.ones(2, jnp.complex64)}
    u, _ = opt.update(tree, opt.init(tree))
    assert u["n"] is None and u["r"].dtype == jnp.float32 and u["c"].dtype == jnp.complex64


# --------------------------------------------------------------------------------------------
# dampened_trace
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_dampened_trace_without_dampening_is_optax_trace(nesterov: bool) -> None:
    g = grads_seq()
    close(
        outputs(V.dampened_trace(0.9, nesterov=nesterov), g),
        outputs(optax.trace(0.9, nesterov=nesterov), g),
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_dampened_trace_matches_torch_sgd_equations(nesterov: bool) -> None:
    g = grads_seq(np.float64).astype(np.float32)
    mu, d = 0.8, 0.3
    b, expected = None, []
    for gt in g.astype(np.float64):
        b = gt.copy() if b is None else mu * b + (1 - d) * gt  # first step: copy, undamped
        expected.append(gt + mu * b if nesterov else b)
    close(outputs(V.dampened_trace(mu, dampening=d, nesterov=nesterov), g), np.array(expected))


# --------------------------------------------------------------------------------------------
# scale_by_amsgrad, scale_by_adam_exact_bias, precise_debias
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{}, {"bias_correction_mu": False, "bias_correction_nu": False}, {"eps_root": 1e-8}]
)
def test_scale_by_amsgrad_matches_optax(kw: dict[str, Any]) -> None:
    g = grads_seq()
    close(
        outputs(V.scale_by_amsgrad(b2=0.9, **kw), g),
        outputs(optax.scale_by_amsgrad(b2=0.9, **kw), g),
    )


def _numpy_adam(g: np.ndarray, b1: float, b2: float, eps: float, *, raw_max: bool) -> np.ndarray:
    m = v = vmax = np.zeros(g.shape[1])
    out = []
    for t, gt in enumerate(g.astype(np.float64), start=1):
        m = b1 * m + (1 - b1) * gt
        v = b2 * v + (1 - b2) * gt**2
        vmax = np.maximum(vmax, v)
        vv = vmax if raw_max else v
        out.append((m / (1 - b1**t)) / (np.sqrt(vv / (1 - b2**t)) + eps))
    return np.array(out)


def test_amsgrad_max_before_correction_is_torch_amsgrad() -> None:
    g = grads_seq()
    expected = _numpy_adam(g, 0.9, 0.99, 1e-8, raw_max=True)
    close(outputs(V.scale_by_amsgrad(b2=0.99, max_before_correction=True), g), expected)
    close(outputs(V.scale_by_adam_exact_bias(b2=0.99, amsgrad=True), g), expected)
    # optax's corrected max is a different rule: it misses by far more than rounding.
    assert np.abs(outputs(V.scale_by_amsgrad(b2=0.99), g) - expected).max() > 1e-3


def test_scale_by_adam_exact_bias_equals_optax_adam_in_float64() -> None:
    with enable_x64(True):
        g = grads_seq(np.float64)
        close(outputs(V.scale_by_adam_exact_bias(), g), outputs(optax.scale_by_adam(), g), 1e-13)


def test_precise_debias_is_accurate_in_float32() -> None:
    t = jnp.arange(1, 200, dtype=jnp.int32)
    exact = 1 - 0.999 ** np.arange(1, 200, dtype=np.float64)
    ours = np.asarray(V.precise_debias(0.999, t), np.float64)
    naive = np.asarray(1 - jnp.float32(0.999) ** t, np.float64)  # optax's float32 form
    assert np.max(np.abs(ours / exact - 1)) < 3e-7
    assert np.max(np.abs(naive / exact - 1)) > 1e-5
    traced = jax.jit(V.precise_debias)(jnp.float32(0.9), t)  # traced decay still works
    np.testing.assert_allclose(traced, 1 - 0.9 ** np.arange(1, 200), rtol=2e-6)


# --------------------------------------------------------------------------------------------
# scale_by_adam_eps_hat (Keras)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True])
def test_scale_by_adam_eps_hat_matches_keras_equations(amsgrad: bool) -> None:
    g = grads_seq(scale=1e-6)
    b1, b2, eps = 0.9, 0.99, 1e-7
    m = v = vmax = np.zeros(5)
    expected = []
    for t, gt in enumerate(g.astype(np.float64), start=1):
        alpha = np.sqrt(1 - b2**t) / (1 - b1**t)
        m = m + (gt - m) * (1 - b1)
        v = v + (gt**2 - v) * (1 - b2)
        vmax = np.maximum(vmax, v)
        expected.append(m * alpha / (np.sqrt(vmax if amsgrad else v) + eps))
    close(
        outputs(V.scale_by_adam_eps_hat(b1, b2, eps, amsgrad=amsgrad), g), np.array(expected), 1e-5
    )


# --------------------------------------------------------------------------------------------
# scale_by_rss(eps_in_sqrt=False) (torch Adagrad) and decoupled_weight_decay
# --------------------------------------------------------------------------------------------


def test_scale_by_rss_eps_outside_matches_torch_equations() -> None:
    g = grads_seq(scale=1e-8)
    s, expected = np.full(5, 0.0), []
    for gt in g.astype(np.float64):
        s = s + gt**2
        expected.append(gt / (np.sqrt(s) + 1e-10))
    torch_form = rmsjax.scale_by_rss(initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False)
    close(outputs(torch_form, g), np.array(expected))
    # eps inside the root (optax / Keras) is far off for tiny gradients.
    inside = outputs(rmsjax.scale_by_rss(initial_accumulator_value=0.0, eps=1e-10), g)
    assert np.abs(inside - np.array(expected)).max() > 0.1


def test_decoupled_weight_decay_with_schedules_and_mask() -> None:
    g = grads_seq()
    params = np.linspace(-1.0, 1.0, 5).astype(np.float32)
    lr = lambda c: 0.1 * 0.5**c
    wd = lambda c: 0.2 + 0.1 * c
    expected = np.array([gt - lr(c) * wd(c) * params for c, gt in enumerate(g)])
    close(outputs(V.decoupled_weight_decay(wd, lr), g, params), expected)
    tree = {"a": jnp.ones(2), "b": jnp.ones(2)}
    opt = V.decoupled_weight_decay(0.5, 0.1, mask={"a": True, "b": False})
    u, _ = opt.update(tree, opt.init(tree), tree)
    np.testing.assert_allclose(u["a"], 1 - 0.05, rtol=1e-7)
    np.testing.assert_allclose(u["b"], 1.0)
    with pytest.raises(ValueError, match="needs the parameters"):
        opt = V.decoupled_weight_decay(0.5, 0.1)
        opt.update(tree, opt.init(tree))


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (V.dampened_trace, {"decay": 1.5}, "decay"),
        (V.dampened_trace, {"decay": 0.9, "dampening": -0.1}, "dampening"),
        (V.scale_by_amsgrad, {"b2": 1.0}, "b2"),
        (V.scale_by_adam_exact_bias, {"b1": -0.1}, "b1"),
        (V.scale_by_adam_eps_hat, {"eps": -1.0}, "eps"),
        (
            rmsjax.scale_by_rss,
            {"initial_accumulator_value": -1.0, "eps_in_sqrt": False},
            "initial_accumulator",
        ),
        (V.decoupled_weight_decay, {"weight_decay": -1.0, "learning_rate": 0.1}, "weight_decay"),
        (V.decoupled_weight_decay, {"weight_decay": 0.1, "learning_rate": -0.1}, "learning_rate"),
    ],
)
def test_variants_reject_out_of_range_values(
    factory: Any, kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(ValueError, match=f"`{name}"):
        factory(**kwargs)


def test_variants_accept_traced_hyperparameters() -> None:
    g = grads_seq()
    for factory, hyper in [
        (V.dampened_trace, {"decay": 0.9, "dampening": 0.2}),
        (V.scale_by_adam_exact_bias, {"b1": 0.8, "b2": 0.99}),
        (V.scale_by_adam_eps_hat, {"b1": 0.8, "b2": 0.99}),
    ]:
        close(outputs(optax.inject_hyperparams(factory)(**hyper), g), outputs(factory(**hyper), g))
