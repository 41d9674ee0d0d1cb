"""The contract table: each rule and guard the native kernel implements, and where it is stated.

A rule exists four times: in JAX (the transformations and :mod:`rmsjax._numerics`), in C++
(``fused_step.cc``), as an independent float64 or NumPy model in the tests, and as the published
statement it reproduces; a guard (a division that must not turn a zero divisor into NaN, the
centered variance's clamp), a rounding or a codec step likewise. :data:`CONTRACTS` lists every
one with the names of its statements, next to the operand table (:mod:`.table`) whose kinds and
flags it covers. Plain data: ``tests/test_contracts.py`` resolves every Python name, finds every
C++ name in ``fused_step.cc``, fails when a kernel kind or flag of the operand table has no row
(a kind's rows must name a model and a differential test), and checks that the table in
``docs/guides/design.md`` is :func:`markdown` (``python -m rmsjax._native.contracts`` prints it).

Names: Python objects by dotted path (``rmsjax.scale_by_rms``,
``tests.test_fused_differential.rms_model``, ``tests.test_numerics.np_rmsprop``); C++ names as
they are spelled in ``fused_step.cc`` (a struct, a function, a generated scalar name); kernel
coverage as ``"<kind>"`` (the kind's rule) or ``"<kind>.<flag>"`` (what the flag switches on),
``"*.<flag>"`` for every kind that has the flag.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CONTRACTS", "Contract", "markdown"]


class Contract(NamedTuple):
    """One rule or guard of the kernel and where each of its statements lives."""

    name: str
    computes: str  # what it computes, in one line
    kernel: tuple[str, ...]  # the kernel kinds and flags it implements (see the module doc)
    jax: tuple[str, ...]  # the JAX statement: rmsjax functions
    cpp: tuple[str, ...]  # the C++ statement: names in fused_step.cc
    model: tuple[str, ...]  # the independent float64 / NumPy restatement
    differential: tuple[str, ...]  # tests holding the kernel to the JAX path (and the model)
    published: tuple[str, ...]  # tests holding the JAX path to the published statement
    source: str  # the published statement (or why there is none)


_SPECIALS = "tests.test_fused_differential.test_kernel_matches_pure_jax_on_special_values"
_AGAINST_JAX = "tests.test_native.test_native_matches_pure_jax"
_FULL_RANGE = (
    "tests.test_numerics.test_full_float32_range_never_nan_and_float64_exact_below_overflow"
)
_NOT_HIDDEN = "tests.test_native.test_a_non_finite_gradient_is_not_hidden"
_LOWBIT_STEPS = "tests.test_fused_lowbit.test_kernel_equals_pure_path_over_steps"
_TIES = "tests.test_fused_lowbit.test_requantisation_ties_and_specials_bit_for_bit"
_ISAS = "tests.test_fused_lowbit.test_every_instruction_set_gives_the_same_results"
_ZERO_STEP = "tests.test_numerics.test_centered_rms_gives_a_zero_step_where_optax_returns_nan"
_CONTRACT = "rmsjax's contract: an exact zero divisor gives 0, a NaN is never hidden"
_EXACT = "tests.test_fused_lowbit.test_kernel_equals_pure_path_over_steps"
_PRESETS_FUSED = "tests.test_compat.test_fused_presets_match_the_framework_like_the_pure_ones"
_PRESET_CONFIGS = "tests.test_fused_differential.test_every_preset_configuration_matches_pure_jax"
_PRESETS = "tests.test_compat.test_preset_matches_framework"

CONTRACTS: tuple[Contract, ...] = (
    Contract(
        name="RMS scaling",
        computes="nu = d nu + (1 - d) g^2; u = g / sqrt(nu / c + eps), or g / (sqrt(nu / c) + eps) "
        "without eps_in_sqrt",
        kernel=("rms", "rms.eps_in_sqrt"),
        jax=("rmsjax.scale_by_rms", "rmsjax._numerics.rms_scale"),
        cpp=("RmsRule",),
        model=("tests.test_fused_differential.rms_model",),
        differential=(_SPECIALS, _AGAINST_JAX),
        published=("tests.test_numerics.np_rmsprop", _FULL_RANGE),
        source="Tieleman & Hinton, Lecture 6.5 (2012)",
    ),
    Contract(
        name="centered RMS",
        computes="mu = d mu + (1 - d) g; the variance nu / c - (mu / c)^2 replaces nu / c",
        kernel=("rms.centered",),
        jax=("rmsjax.scale_by_centered_rms",),
        cpp=("RmsRule",),
        model=("tests.test_fused_differential.rms_model",),
        differential=(_SPECIALS, _AGAINST_JAX),
        published=("tests.test_numerics.np_rmsprop", _FULL_RANGE),
        source="Graves, Generating Sequences With Recurrent Neural Networks (2013), eq. 38-40",
    ),
    Contract(
        name="centered clamp",
        computes="variance = +inf where nu / c = +inf, else max(nu / c - (mu / c)^2, 0); NaN "
        "stays NaN",
        kernel=("rms.centered",),
        jax=("rmsjax.scale_by_centered_rms",),
        cpp=("RmsRule",),
        model=("tests.test_fused_differential.max0", "tests.test_fused_differential.rms_model"),
        differential=(_SPECIALS, _NOT_HIDDEN),
        published=(_ZERO_STEP,),
        source="rmsjax's contract: finite gradients never give NaN (the zero step for |g| >= 2^64)",
    ),
    Contract(
        name="momentum (trace)",
        computes="m = g + b m; u = m, or g + b m with nesterov (for rms, g is the rule's update "
        "r, or the scaled step lr r with scale_first)",
        kernel=("rms.momentum", "rms.nesterov", "sgd.momentum", "sgd.nesterov"),
        jax=("rmsjax.trace",),
        cpp=("StepAndTrace", "RmsRule", "SgdRule"),
        model=(
            "tests.test_fused_differential.rms_model",
            "tests.test_fused_differential.sgd_model",
        ),
        differential=(_SPECIALS, _AGAINST_JAX),
        published=("tests.test_numerics.np_sgd", _FULL_RANGE),
        source="Polyak (1964) heavy ball; Sutskever et al. (2013) Nesterov, in optax's form",
    ),
    Contract(
        name="step size and momentum order",
        computes="scale_first: m = b m + lr r, p + m (the learning rate inside the buffer: optax, "
        "Keras, TF1 RMSProp, Keras SGD); else m = b m + r, p + lr m (PyTorch RMSprop, optax and "
        "PyTorch SGD); the other step size is 1",
        kernel=("rms.scale_first", "sgd.scale_first"),
        jax=("rmsjax.trace", "rmsjax.scale_by_learning_rate", "rmsjax.fused.plans.plan"),
        cpp=("StepAndTrace", "DeriveSteps"),
        model=(
            "tests.test_fused_differential.rms_model",
            "tests.test_fused_differential.sgd_model",
        ),
        differential=(_SPECIALS, _PRESET_CONFIGS, _EXACT, _PRESETS_FUSED),
        published=(_PRESETS,),
        source="torch.optim.RMSprop and SGD (lr after the buffer); keras.optimizers.RMSprop and "
        "SGD (lr inside it)",
    ),
    Contract(
        name="maximize",
        computes="g = -g before everything else (a leading scale by -1)",
        kernel=("*.maximize",),
        jax=("rmsjax.scale", "rmsjax.compat.pytorch.rmsprop"),
        cpp=("Prologue",),
        model=("tests.test_fused_differential.rms_model",),
        differential=(_SPECIALS, _PRESET_CONFIGS, _EXACT, _PRESETS_FUSED),
        published=(_PRESETS,),
        source="torch.optim's maximize (the gradient negated first)",
    ),
    Contract(
        name="coupled weight decay",
        computes="g = g + wd p before the rule (bfloat16 parameters: a bfloat16 product with a "
        "Python-number wd, decay_bf16)",
        kernel=("*.coupled_decay", "*.decay_bf16"),
        jax=("rmsjax.add_decayed_weights", "rmsjax._native.table.DECAY_FLAGS"),
        cpp=("Prologue", "Keep", "DeriveTerms"),
        model=(
            "tests.test_fused_differential.rms_model",
            "tests.test_fused_differential.adam_model",
            "tests.test_fused_differential.sgd_model",
        ),
        differential=(_SPECIALS, _PRESET_CONFIGS, _EXACT, _PRESETS_FUSED),
        published=(_PRESETS,),
        source="torch.optim's weight_decay (L2 added to the gradient)",
    ),
    Contract(
        name="decoupled weight decay",
        computes="u = u - (lr wd) p after the step size and the momentum buffer (bfloat16: two "
        "more bfloat16 operations with a Python-number coefficient, decay_bf16)",
        kernel=("*.decoupled_decay", "*.decay_bf16"),
        jax=("rmsjax.decoupled_weight_decay",),
        cpp=("Epilogue", "DeriveTerms"),
        model=(
            "tests.test_fused_differential.rms_model",
            "tests.test_fused_differential.adam_model",
            "tests.test_fused_differential.sgd_model",
        ),
        differential=(_SPECIALS, _PRESET_CONFIGS, _EXACT, _PRESETS_FUSED),
        published=(_PRESETS,),
        source="Loshchilov & Hutter (2019), as torch.optim.AdamW and Keras' weight_decay apply it",
    ),
    Contract(
        name="Adam",
        computes="mu = b1 mu + (1 - b1) g; nu = b2 nu + (1 - b2) g^2; u = (mu / c1) / "
        "(sqrt(nu / c2 + eps_root) + eps)",
        kernel=("adam",),
        jax=("rmsjax.scale_by_adam",),
        cpp=("AdamRule",),
        model=("tests.test_fused_differential.adam_model",),
        differential=(_SPECIALS, _AGAINST_JAX),
        published=("tests.test_numerics.np_adam", _FULL_RANGE),
        source="Kingma & Ba, Adam (2015), Algorithm 1",
    ),
    Contract(
        name="epsilon-hat Adam",
        computes="u = alpha mu / (sqrt(nu) + eps_hat), alpha = sqrt(1 - b2^t) / (1 - b1^t) "
        "computed by JAX",
        kernel=("adam.eps_hat",),
        jax=("rmsjax.scale_by_adam_eps_hat",),
        cpp=("AdamRule", "kAlpha"),
        model=("tests.test_fused_differential.adam_model",),
        differential=(_SPECIALS, _PRESET_CONFIGS, _EXACT, _PRESETS_FUSED),
        published=(_PRESETS,),
        source="Kingma & Ba, Adam (2015), section 2 (the epsilon-hat form), as Keras computes it",
    ),
    Contract(
        name="Nesterov Adam",
        computes="mu_hat = b1 mu / c1_next + (1 - b1) g / c1 replaces mu / c1",
        kernel=("adam.nesterov",),
        jax=("rmsjax.scale_by_adam",),
        cpp=("AdamRule",),
        model=("tests.test_fused_differential.adam_model",),
        differential=(_SPECIALS, _AGAINST_JAX),
        published=(),
        source="Dozat, Incorporating Nesterov Momentum into Adam (2016), in optax's form; no "
        "float64 check against it in tests/test_numerics.py",
    ),
    Contract(
        name="weight decay",
        computes="u = u + wd p before the step size; bfloat16 parameters with a Python-number wd: "
        "two bfloat16 operations (decay_bf16)",
        kernel=("adam.weight_decay", "adam.decay_bf16"),
        jax=("rmsjax.add_decayed_weights", "rmsjax.adamw"),
        cpp=("AdamRule", "AfterRule"),
        model=("tests.test_fused_differential.adam_model",),
        differential=(_SPECIALS, _AGAINST_JAX, _LOWBIT_STEPS),
        published=("tests.test_numerics.np_adam", _FULL_RANGE),
        source="Loshchilov & Hutter, Decoupled Weight Decay Regularization (2019)",
    ),
    Contract(
        name="SGD, step and apply",
        computes="p = p + s u with the step size s = -lr (schedules evaluated by JAX), for "
        "every kind",
        kernel=("sgd",),
        jax=("rmsjax.sgd", "rmsjax.scale_by_learning_rate", "rmsjax.apply_updates"),
        cpp=("SgdRule", "StoreP", "kStepSize"),
        model=("tests.test_fused_differential.sgd_model",),
        differential=(_SPECIALS, _AGAINST_JAX),
        published=("tests.test_numerics.np_sgd", _FULL_RANGE),
        source="gradient descent, p - lr g",
    ),
    Contract(
        name="moving average",
        computes="(1 - d) x + d old, both weights passed by JAX; the product fused into an FMA "
        "follows XLA's choice for the gradients' dtype and the terms around the rule",
        kernel=("rms", "adam"),
        jax=("rmsjax._numerics.ema",),
        cpp=("Ema", "EmaEither", "MovingAverageOrder", "Arith"),
        model=(
            "tests.test_fused_differential.rms_model",
            "tests.test_fused_differential.adam_model",
        ),
        differential=(_SPECIALS, _AGAINST_JAX),
        published=("tests.test_numerics.np_rmsprop", "tests.test_numerics.np_adam"),
        source="optax's operand order (its scale_by_rms and scale_by_adam)",
    ),
    Contract(
        name="bias correction",
        computes="c = 1 - d^t at the int32-saturating count t, computed by JAX (the rule's own "
        "step arguments, recorded as stages) and passed as scalars; x / c a division, and "
        "(mu / c1) / den as mu / (c1 den), as XLA computes them in a tree of several leaves "
        "(for a single leaf XLA multiplies by 1 / c instead: an ulp away)",
        kernel=("rms", "adam"),
        jax=(
            "rmsjax._numerics.debias",
            "rmsjax._numerics.increment",
            "rmsjax.fused.plans.plan",
        ),
        cpp=("kCorrection", "kC1", "kC2", "kC1Next", "RmsRule", "AdamRule"),
        model=("tests.test_fused_differential.debias",),
        differential=(_SPECIALS,),
        published=("tests.test_numerics.np_rmsprop", "tests.test_numerics.np_adam"),
        source="Kingma & Ba, Adam (2015), section 3",
    ),
    Contract(
        name="safe_div",
        computes="where(den != 0, num / den, 0): an exact zero divisor gives 0, a NaN one NaN",
        kernel=("rms",),
        jax=("rmsjax._numerics.safe_div", "rmsjax._numerics.rms_scale"),
        cpp=("SafeDiv",),
        model=("tests.test_fused_differential.safe_div",),
        differential=(_SPECIALS, _NOT_HIDDEN),
        published=(_FULL_RANGE,),
        source=_CONTRACT,
    ),
    Contract(
        name="moment_div",
        computes="safe_div, and 0 where den = +inf while g is finite (the zero step for |g| >= "
        "2^64, even when the numerator overflowed too)",
        kernel=("adam",),
        jax=("rmsjax._numerics.moment_div",),
        cpp=("MomentDiv",),
        model=("tests.test_fused_differential.moment_div",),
        differential=(_SPECIALS, _NOT_HIDDEN),
        published=(_FULL_RANGE,),
        source=_CONTRACT,
    ),
    Contract(
        name="safe_rsqrt_scale",
        computes="where(den2 != 0, g rsqrt(den2), 0), rsqrt as a correctly rounded 1 / sqrt",
        kernel=("rms.eps_in_sqrt",),
        jax=("rmsjax._numerics.safe_rsqrt_scale", "rmsjax._numerics.rms_scale"),
        cpp=("SafeRsqrtScale",),
        model=("tests.test_fused_differential.safe_rsqrt_scale",),
        differential=(_SPECIALS, _NOT_HIDDEN),
        published=(_FULL_RANGE,),
        source=_CONTRACT,
    ),
    Contract(
        name="bfloat16 rounding",
        computes="bfloat16 parameters: round to nearest even where the pure chain as XLA "
        "executes it rounds (each cast of an update, each bfloat16 operation feeding another)",
        kernel=("*.bf16",),
        jax=("rmsjax.tree.map_rule", "rmsjax.apply_updates"),
        cpp=("RoundBf16", "Narrow", "Widen"),
        model=(),
        differential=(_LOWBIT_STEPS, _AGAINST_JAX),
        published=(),
        source="IEEE 754 roundTiesToEven, as XLA converts float32 to bfloat16 (bit-exact against "
        "the pure path; no model)",
    ),
    Contract(
        name="denormals flushed",
        computes="inputs and results below the float32 normal range are 0, as XLA's CPU code "
        "computes",
        kernel=("rms", "adam", "sgd"),
        jax=(),
        cpp=("ScopedFlushDenormal",),
        model=("tests.test_fused_differential.E",),
        differential=(_SPECIALS,),
        published=(_FULL_RANGE,),
        source="XLA's CPU backend (flush-to-zero and denormals-are-zero), not an rmsjax function",
    ),
    Contract(
        name="codec lookup",
        computes="the code of v = x / scale is #(breakpoints <= v), found with the codec "
        "operand's cell table",
        kernel=("*.q8",),
        jax=("rmsjax.quantization.rounding.lookup", "rmsjax.quantization.rounding.breakpoints"),
        cpp=("Lookup", "EncodeAvx2", "Search512", "ReadCodec"),
        model=("rmsjax._native.codecs.lookup_model",),
        differential=(
            "tests.test_fused_lowbit.test_codec_operand_lookup_equals_the_codecs_lookup",
            _TIES,
            _ISAS,
        ),
        published=("tests.test_quantization.test_maps_are_the_libraries_maps",),
        source="Dettmers et al., 8-bit Optimizers via Block-wise Quantization (2022): the "
        "dynamic map; rounding to the nearest code",
    ),
    Contract(
        name="codec encode",
        computes="per block: clip to the float32 range, scale = largest magnitude (NaN with a "
        "NaN), v = x / scale (1 for a zero scale), the code of v (NaN: the code of -1)",
        kernel=("*.q8",),
        jax=("rmsjax.quantization.BlockCodec.encode",),
        cpp=("Encode", "EncodeAvx2", "EncodeAvx512", "ClipAndTrack", "BlockScale", "BlockDivisor"),
        model=(),
        differential=(_TIES, _LOWBIT_STEPS, _ISAS),
        published=(
            "tests.test_quantization.test_nearest_codec_round_trip",
            "tests.test_quantization.test_nan_stays_visible_under_nearest",
        ),
        source="Dettmers et al. (2022), block-wise absmax quantization (bit-exact against the "
        "JAX codec; no model)",
    ),
    Contract(
        name="codec decode",
        computes="x = qmap[code] scale, one float32 product",
        kernel=("*.q8",),
        jax=("rmsjax.quantization.BlockCodec.decode",),
        cpp=("Decode", "DecodeAvx2", "DecodeAvx512"),
        model=(),
        differential=(_LOWBIT_STEPS, _ISAS),
        published=("tests.test_quantization.test_nearest_codec_round_trip",),
        source="Dettmers et al. (2022) (bit-exact against the JAX codec; no model)",
    ),
)


def _shown(name: str) -> str:
    """A name as the table shows it: one in ``tests/`` as ``<file>.py::<name>``."""
    if name.startswith("tests."):
        module, _, rest = name.rpartition(".")
        return f"`{module.removeprefix('tests.')}.py::{rest}`"
    return f"`{name}`"


def _cell(names: tuple[str, ...]) -> str:
    return ", ".join(_shown(n) for n in names) or "none"


def _text(text: str) -> str:
    """Plain text in a table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def markdown() -> str:
    """:data:`CONTRACTS` as a Markdown table (the one in ``docs/guides/design.md``)."""
    head = (
        "| rule or guard | computes | kernel | JAX | C++ (`fused_step.cc`) | model | "
        "kernel = JAX (tests) | JAX = published (tests) | published statement |"
    )
    lines = [head, "|" + "---|" * 9]
    for c in CONTRACTS:
        cells = [
            _text(c.name),
            _text(c.computes),
            ", ".join(f"`{k}`" for k in c.kernel),
            _cell(c.jax),
            ", ".join(f"`{n}`" for n in c.cpp) or "none",
            _cell(c.model),
            _cell(c.differential),
            _cell(c.published),
            _text(c.source),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
