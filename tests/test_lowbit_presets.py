"""rmsjax.compat.bitsandbytes and rmsjax.compat.torchao against the real libraries.

``tests/reference/lowbit.npz`` (``python tests/reference/generate.py --only lowbit``) holds
30-step runs of bitsandbytes 0.50 ``Adam8bit`` / ``AdamW8bit`` / ``RMSprop8bit`` and torchao
0.18 ``AdamW8bit`` / ``AdamW4bit`` on the CPU: one parameter above the libraries' 4096-entry
minimum (8/4-bit state) and one below it (float32 state), the gradients the libraries saw, the
parameters after steps 1, 2, 10 and 30 (every step for the small one), the final states as the
libraries hold them (codes and scales), and the classes' signatures. The presets replay the
stored gradients in one jitted scan.

Tolerances. The presets perform the libraries' operations in another order (optax's
``sqrt(v / c2)`` for torchao's ``sqrt(v) / sqrt(c2)``, one update ``-lr (adam + wd p)`` for two
in-place subtractions, ...), so each step's float32 results differ by a few ulps, and those
differences compound: after 30 steps the parameters (of order 1) are within 4e-6 of the
library's; the tolerance is 1e-5. A rounding difference at a tie between two codes would flip
a code: the final codes are compared entry by entry and may differ in at most 0.2% of the
entries (none do in the stored runs); where they agree, the decoded states agree to the ulps of
the block scales. The "wrong scheme" contrasts (another block size, a linear map instead of the
dynamic one, a 4-bit map with a zero code, nearest rounding instead of bitsandbytes' CPU grid)
miss the stored parameters by more than 100 times the tolerance.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
import rmsjax.compat.bitsandbytes as bnb
import rmsjax.compat.torchao as tao
from rmsjax.quantization import BlockCodec, bitsandbytes_codec, linear_map, torchao_codec
from rmsjax.storage import decode, is_stored

REF = np.load(Path(__file__).resolve().parent / "reference" / "lowbit.npz")
LOWBIT = json.loads(str(REF["lowbit_cases"]))
SIGNATURES = json.loads(str(REF["signatures"]))
CASES = {case["name"]: case for case in LOWBIT["cases"]}
F32 = np.float32
TOLERANCE = 1e-5

PRESETS = {
    ("bitsandbytes", "Adam8bit"): bnb.adam8bit,
    ("bitsandbytes", "AdamW8bit"): bnb.adamw8bit,
    ("bitsandbytes", "RMSprop8bit"): bnb.rmsprop8bit,
    ("torchao8", "AdamW8bit"): tao.adamw8bit,
    ("torchao4", "AdamW4bit"): tao.adamw4bit,
}


def library_codecs(library: str) -> tuple[BlockCodec, BlockCodec]:
    if library == "bitsandbytes":
        return bitsandbytes_codec(signed=True), bitsandbytes_codec(signed=False)
    bits = 8 if library == "torchao8" else 4
    return torchao_codec(bits, signed=True), torchao_codec(bits, signed=False)


def replay(case: dict[str, Any], opt: optax.GradientTransformation) -> tuple[Any, Any]:
    """The stored gradients through ``opt``, jitted: (params after every step, final state)."""
    shapes = {"big": tuple(LOWBIT["big"][case["library"]]), "small": tuple(LOWBIT["small"])}
    params = {
        name: jnp.asarray(np.random.default_rng([20261121, salt]).normal(size=shape), F32)
        for salt, (name, shape) in enumerate(shapes.items())
    }
    grads = {
        name: jnp.asarray(
            (REF[f"{case['name']}/{name}/grads"].astype(np.uint32) << 16).view(F32)
        ).reshape(-1, *shape)
        for name, shape in shapes.items()
    }

    def body(carry: Any, g: Any) -> Any:
        p, s = carry
        u, s = opt.update(g, s, p)
        p = rmsjax.apply_updates(p, u)
        return (p, s), p

    (_, state), trajectory = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), grads))(params)
    return jax.tree.map(np.asarray, trajectory), state


def preset_for(case: dict[str, Any]) -> optax.GradientTransformation:
    kwargs = dict(case["kwargs"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return PRESETS[(case["library"], case["optimizer"])](**kwargs)


def parameter_error(case: dict[str, Any], trajectory: Any) -> float:
    """The largest deviation from the library's parameters, over every stored step."""
    checkpoints = [t - 1 for t in LOWBIT["checkpoints"]]
    big = np.abs(trajectory["big"][checkpoints] - REF[f"{case['name']}/big/params"])
    small = np.abs(trajectory["small"] - REF[f"{case['name']}/small/params"][1:])
    return float(max(big.max(), small.max()))


@pytest.mark.parametrize("preset", sorted(SIGNATURES))
def test_signatures_are_the_libraries(preset: str) -> None:
    """Argument names, order, kinds and defaults of the classes (``params`` left out)."""
    module, name = preset.split(".")
    fn = getattr(bnb if module == "bitsandbytes" else tao, name)
    got = [
        [p.name, p.kind.name, list(p.default) if isinstance(p.default, tuple) else p.default]
        for p in inspect.signature(fn).parameters.values()
    ]
    assert got == SIGNATURES[preset]


@pytest.mark.parametrize("name", sorted(CASES))
def test_presets_replay_the_libraries(name: str) -> None:
    case = CASES[name]
    trajectory, state = replay(case, preset_for(case))
    assert parameter_error(case, trajectory) <= TOLERANCE
    stored = [x for x in jax.tree.leaves(state, is_leaf=is_stored) if is_stored(x)]
    plain = [x for x in jax.tree.leaves(state, is_leaf=is_stored) if not is_stored(x)]
    slots = ["state1"] if case["optimizer"] == "RMSprop8bit" else ["state1", "state2"]
    codecs = library_codecs(case["library"])
    shape = tuple(LOWBIT["big"][case["library"]])
    assert len(stored) == len(slots)  # the big parameter's moments, quantized
    for got, slot, codec in zip(stored, slots, codecs, strict=False):
        assert got.data.codec == codec  # RMSprop8bit's one state: the signed map
        codes = REF[f"{name}/big/{slot}"]
        scales = REF[f"{name}/big/{slot}_scales"]
        same = np.asarray(got.data.codes).reshape(-1) == codes.reshape(-1)
        assert np.mean(~same) <= 2e-3
        mine = np.asarray(decode(got)).reshape(-1)
        theirs = np.asarray(codec.decode(codes, scales, shape)).reshape(-1)
        ok = same if codec.bits == 8 else np.repeat(same, 2)[: mine.size]
        np.testing.assert_allclose(mine[ok], theirs[ok], rtol=2e-6, atol=0)
    # The small parameter's moments are float32 arrays, as in the libraries.
    small = [x for x in plain if np.shape(x) == tuple(LOWBIT["small"])]
    assert len(small) == len(slots)
    for got, slot in zip(small, slots, strict=True):
        want = REF[f"{name}/small/{slot}"]
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-9)


def _adam_chain(kind: str, first: BlockCodec, second: BlockCodec, wd: float) -> Any:
    """The preset's chain with other codecs (the float32 parameters need no cast)."""
    mu, nu = rmsjax.quantized(codec=first), rmsjax.quantized(codec=second)
    if kind == "bitsandbytes":
        scaler = rmsjax.scale_by_adam_exact_bias(mu_dtype=mu, nu_dtype=nu)
    else:
        scaler = rmsjax.scale_by_adam(mu_dtype=mu, nu_dtype=nu)
    lr = 1e-3
    return optax.chain(
        scaler, rmsjax.scale_by_learning_rate(lr), rmsjax.decoupled_weight_decay(wd, lr)
    )


def _linear(codec: BlockCodec, *, signed: bool, zero: bool = True) -> BlockCodec:
    levels = len(codec.qmap)
    return dataclasses.replace(codec, qmap=tuple(linear_map(levels, signed=signed).tolist()))


def _wrong_schemes() -> list[tuple[str, str, Any]]:
    bs, bu = library_codecs("bitsandbytes")
    t8s, t8u = library_codecs("torchao8")
    t4s, t4u = library_codecs("torchao4")
    blocks = lambda c, n: dataclasses.replace(c, block_size=n)
    nearest = lambda c: dataclasses.replace(c, convention="nearest", normalize="divide")
    return [
        (
            "bnb_adam8bit_defaults",
            "block 128",
            _adam_chain("bitsandbytes", *(blocks(c, 128) for c in (bs, bu)), 0.0),
        ),
        (
            "bnb_adam8bit_defaults",
            "linear map",
            _adam_chain("bitsandbytes", _linear(bs, signed=True), _linear(bu, signed=False), 0.0),
        ),
        (
            "bnb_adam8bit_defaults",
            "nearest rounding",
            _adam_chain("bitsandbytes", nearest(bs), nearest(bu), 0.0),
        ),
        (
            "torchao_adamw8bit_defaults",
            "block 128",
            _adam_chain("torchao", blocks(t8s, 128), blocks(t8u, 128), 1e-2),
        ),
        (
            "torchao_adamw4bit_defaults",
            "map with a zero",
            _adam_chain("torchao", t4s, _linear(t4u, signed=False), 1e-2),
        ),
        (
            "torchao_adamw4bit_defaults",
            "block 64",
            _adam_chain("torchao", blocks(t4s, 64), blocks(t4u, 64), 1e-2),
        ),
    ]


WRONG = [(name, scheme) for name, scheme, _ in _wrong_schemes()]


@pytest.mark.parametrize(("name", "scheme"), WRONG)
def test_wrong_schemes_miss_by_far(name: str, scheme: str) -> None:
    opt = {(n, s): o for n, s, o in _wrong_schemes()}[(name, scheme)]
    case = CASES[name]
    trajectory, _ = replay(case, opt)
    assert parameter_error(case, trajectory) > 100 * TOLERANCE, scheme


def test_wrong_scheme_chain_is_the_preset_with_the_library_codecs() -> None:
    """The contrasts differ from the presets ONLY in the codec: with the libraries' codecs the
    same hand-built chains replay the runs within the tolerance."""
    for name, first, second, wd in [
        ("bnb_adam8bit_defaults", *library_codecs("bitsandbytes"), 0.0),
        ("torchao_adamw4bit_defaults", *library_codecs("torchao4"), 1e-2),
    ]:
        kind = "bitsandbytes" if name.startswith("bnb") else "torchao"
        trajectory, _ = replay(CASES[name], _adam_chain(kind, first, second, wd))
        assert parameter_error(CASES[name], trajectory) <= TOLERANCE


def test_rmsprop8bit_ignores_momentum_and_supports_centered() -> None:
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), F32)}
    grads = {"w": jnp.sin(params["w"] * 3.0)}

    def steps(opt: Any, n: int = 5) -> Any:
        p, s = params, opt.init(params)
        for _ in range(n):
            u, s = opt.update(grads, s, p)
            p = rmsjax.apply_updates(p, u)
        return p, s

    still, _ = steps(bnb.rmsprop8bit(lr=1e-2))
    moving, _ = steps(bnb.rmsprop8bit(lr=1e-2, momentum=0.9))
    np.testing.assert_array_equal(np.asarray(still["w"]), np.asarray(moving["w"]))
    centered, state = steps(bnb.rmsprop8bit(lr=1e-2, centered=True))
    moments = [x for x in jax.tree.leaves(state, is_leaf=is_stored) if is_stored(x)]
    assert len(moments) == 2  # mu and nu, both 8-bit with the signed map
    assert all(m.data.codec == bitsandbytes_codec(signed=True) for m in moments)
    assert np.all(np.isfinite(np.asarray(centered["w"])))
    assert not np.array_equal(np.asarray(centered["w"]), np.asarray(still["w"]))


def test_arguments_are_checked_like_the_libraries() -> None:
    with pytest.raises(ValueError, match="`amsgrad` must be False"):
        bnb.adam8bit(amsgrad=True)
    with pytest.raises(ValueError, match="`optim_bits` must be 32"):
        bnb.adamw8bit(optim_bits=8)
    with pytest.raises(TypeError, match="`args` must be None"):
        bnb.rmsprop8bit(args=object())
    with pytest.raises(ValueError, match="`min_8bit_size`"):
        bnb.adam8bit(min_8bit_size=-1)
    with pytest.raises(ValueError, match=r"`betas\[1\]`"):
        bnb.adam8bit(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="`momentum`"):
        bnb.rmsprop8bit(momentum=1.0)
    with pytest.raises(ValueError, match="`alpha`"):
        bnb.rmsprop8bit(alpha=1.0)
    with pytest.raises(ValueError, match="`block_size`"):
        tao.adamw8bit(block_size=0)
    with pytest.raises(ValueError, match=r"`block_size`.*even"):
        tao.adamw4bit(block_size=127)
    with pytest.raises(ValueError, match="`lr`"):
        tao.adamw4bit(lr=-1.0)
    # sizes below the minimum, or (torchao) not a multiple of the block, stay float32
    state = tao.adamw8bit().init({"a": jnp.ones((65, 65)), "b": jnp.ones((64, 64))})
    assert not is_stored(state[1].mu["a"]) and is_stored(state[1].mu["b"])
    state = bnb.adam8bit(min_8bit_size=0).init({"a": jnp.ones(3)})
    assert is_stored(state[1].mu["a"])


def test_bf16_stochastic_round() -> None:
    """bfloat16 weights at 1.0 (ulp 2^-8 below 1) and a constant gradient: Adam's step is
    lr = 1e-4 per step, below half an ulp, so rounding to nearest leaves the weights at 1.0
    for ever. torchao's bf16_stochastic_round rounds each new weight up or down so that its
    expectation is the float32 value: the mean of M weights after T steps is within 5
    standard deviations (ulp * sqrt(T / (4 M))) of 1 - T lr."""
    steps, m, lr = 200, 8192, 1e-4
    params = {"w": jnp.ones((m // 128, 128), jnp.bfloat16)}
    grads = {"w": jnp.ones((m // 128, 128), jnp.bfloat16)}

    def run(stochastic: bool) -> tuple[Any, Any]:
        opt = tao.adamw8bit(lr=lr, weight_decay=0.0, bf16_stochastic_round=stochastic)

        def body(_: Any, carry: Any) -> Any:
            p, s = carry
            u, s = opt.update(grads, s, p)
            return rmsjax.apply_updates(p, u), s

        u, _ = opt.update(grads, opt.init(params), params)
        assert u["w"].dtype == jnp.float32  # torchao computes the step in float32
        return jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, opt.init(p))))(params)

    nearest, _ = run(False)
    stochastic, state = run(True)
    assert stochastic["w"].dtype == jnp.bfloat16
    assert np.all(np.asarray(nearest["w"], F32) == 1.0)
    mean = float(np.mean(np.asarray(stochastic["w"], np.float64)))
    bound = 5 * 2.0**-8 * np.sqrt(steps / (4 * m))
    assert abs(mean - (1 - steps * lr)) <= bound
    assert steps * lr > 10 * bound
    assert state[-1].key.dtype == jnp.uint32  # the random key lives in the state
