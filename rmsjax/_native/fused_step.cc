// rmsjax native CPU step: one XLA FFI call updates the parameters AND the optimizer state of
// every leaf of a tree in a single pass over memory, in place when XLA aliases the buffers
// (the Python side declares input_output_aliases and the caller donates the inputs).
//
// The arithmetic mirrors, operation for operation, the pure-JAX rules in rmsjax/transforms/
// (_rms_rule, _centered_rms_rule, _scale_rule, _trace_rule, _adam_rule, _adam_eps_hat_rule,
// _decay_rule, _decoupled_decay_rule) composed as the recorded chain applies them (the kind,
// its flags and the order they encode: rmsjax/_native/table.py), then p + u; on every input,
// NaN and Inf included (see "Guards" below); with bfloat16 parameters it rounds where the pure
// chain rounds (see the rules), and with 8-bit state it decodes and encodes as
// rmsjax.quantization's codec does. Hyperparameters arrive as a float32 operand computed by JAX
// (so schedules and injected hyperparameters are traced values, not constants).
//
// Operands (defined ONLY by rmsjax/_native/table.py, from which the build generates
// rmsjax_kernel_table.h: the scalar, slot, flag and codec names used below):
//   scalars f32[<kind>::scalar::kCount], then (flag q8) one codec operand per present slot,
//   then per leaf: p, g, and per present slot its state: one f32 array, or (q8) codes u8 and
//   scales f32
//   results, per leaf: p, then per slot the new state   (aliased to the operands)
// with the slots of the kind whose flag is set, in table order; p and g are f32, or bf16 with
// the flag bf16. Attributes: kind (the table's kind id), flags (bit mask of the kind's flags),
// leaves (number of leaves), table (the table hash). Every call is checked against the table
// exactly; a mismatch is an FFI error.
//
// 8-bit state (q8): rmsjax.quantized(bits=8) with rmsjax's codec (blocks along the last axis,
// nearest rounding, the scale a block's largest magnitude). The kernel goes block by block:
// decode each slot's block (map value times scale) into a stack buffer, run the rule over the
// block (writing the parameters), then requantise each slot from the buffer (clip to the
// float32 range, the new scale, v = x / scale, the nearest code by the codec's own breakpoints,
// passed in the codec operand): one pass over memory, as with float32 state.
//
// Threads: the handler is asynchronous (it returns an ffi::Future). It hands the call's
// elements to XLA's intra-op thread pool as a few tasks that claim blocks from a shared counter
// and returns at once; the task that finishes the last block completes the future. The kernel
// starts no threads of its own, so it never competes with XLA's threads for the cores, and the
// several calls of one step (one per LEAVES_PER_CALL leaves) run back to back without a join
// between them (see Job and FusedStepImpl at the end of this file).
//
// Guards: a divisor that is exactly 0 gives 0 (as rmsjax._numerics.safe_div/safe_rsqrt_scale);
// a NaN divisor gives NaN, never 0, so a broken run does not look healthy. The pure rules emit
// no guard when eps is a concrete value > 0; then the divisor is never 0 and the guard changes
// nothing. The centered variance is where(nu_hat == +inf, +inf, max(nu_hat - mu_hat^2, 0)), so
// inf - inf never turns a huge finite gradient into NaN (the step is then 0).
//
// Each loop below is written once, as the always-inline Loop of a struct, and compiled twice:
// into a baseline function and, on x86-64, into an AVX2+FMA function (target attribute), the
// latter chosen at run time when the CPU has both (see Dispatch); the loops for 8-bit state
// are compiled a third time, for AVX-512 (F, BW, DQ, VL, VBMI, GFNI: decode and encode by
// in-register permutes instead of gathers, see DecodeAvx512 and EncodeAvx512), chosen when the
// CPU has those. The library needs no -march flag, so it runs on any x86-64 CPU. Only IEEE
// operations are used (+ - * / sqrt, fused multiply-add, correctly rounded; no reciprocal or
// rsqrt approximations). The build passes -ffp-contract=off and each fused multiply-add is
// written where XLA's CPU code has one (Arith): the AVX2+FMA version rounds like the pure-JAX
// path on an FMA CPU, the baseline version like it on a CPU without FMA (the two versions can
// differ in the last bits, as XLA itself does).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "rmsjax_kernel_table.h"  // generated from rmsjax/_native/table.py by build.py
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace tbl = rmsjax_table;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kF32Max = std::numeric_limits<float>::max();
constexpr int kMaxBlock = tbl::codec::kMaxBlock;
constexpr int kMapSize = tbl::codec::kMapSize;

// The instruction sets the loops are compiled for (see KernelIsa).
constexpr int kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;

// One leaf's arrays. Parameters and gradients are float32 or (flag bf16) bfloat16, kept as
// raw pointers; the state arrays are indexed by the kind's slot enum (absent slots null):
// float32 arrays, or (flag q8) uint8 codes and float32 scales, one scale per block of ``block``
// entries along the last axis (``cols`` entries per row, ``nb`` blocks per row, the last one
// of a row possibly short).
struct Leaf {
  int64_t n = 0;      // elements
  int64_t units = 0;  // what the work is divided in: elements, or (q8) blocks
  int64_t cols = 0;   // q8: length of the last axis
  int64_t nb = 0;     // q8: blocks per row
  const void* p = nullptr;
  const void* g = nullptr;
  void* p_out = nullptr;
  const float* s_in[tbl::kMaxSlots] = {};
  float* s_out[tbl::kMaxSlots] = {};
  const uint8_t* c_in[tbl::kMaxSlots] = {};
  uint8_t* c_out[tbl::kMaxSlots] = {};
  const float* sc_in[tbl::kMaxSlots] = {};
  float* sc_out[tbl::kMaxSlots] = {};
};

// An 8-bit codec, read from its operand by ReadCodec (rmsjax._native.codecs builds the operand
// from rmsjax.quantization; its fields and sections are defined in rmsjax/_native/table.py),
// plus the tables the AVX-512 loops derive from it.
struct Codec {
  int block = 0;
  uint32_t lo_bits = 0;
  int shift = 0;
  int half = 0;
  alignas(32) float qmap[kMapSize];
  alignas(32) float points[kMapSize];
  std::vector<uint8_t> cells;  // the cell table, with the operand's padding
  // The breakpoints by level of a branch-free binary search (AVX-512 encode, see Search512):
  // level l (l = 0..7, step s = 128 >> l) holds points[j * 2s + s - 1] for j < 2**l at
  // position Reverse(j, l) (its l bits in reverse order), padded to 16 entries; the last three
  // levels fill 32, 64 and 128 entries.
  alignas(64) float level[5][16];
  alignas(64) float level5[32];
  alignas(64) float level6[64];
  alignas(64) float level7[128];
  // The map as four byte planes (plane k holds byte k of each value, little-endian), read 64
  // codes at a time by byte permutes (AVX-512 VBMI decode, see DecodeAvx512).
  alignas(64) uint8_t plane[4][kMapSize];
};

[[gnu::always_inline]] inline uint32_t Bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

[[gnu::always_inline]] inline float FromBits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// Fills the binary-search levels of ``c`` from its breakpoints.
void FillLevels(Codec& c) {
  float* dst[8] = {c.level[0], c.level[1], c.level[2], c.level[3],
                   c.level[4], c.level5,   c.level6,   c.level7};
  for (int l = 0; l < 8; ++l) {
    const int s = 128 >> l, n = 1 << l;
    for (int j = 0; j < std::max(n, 16); ++j) {
      int r = 0;  // j % n with its l bits reversed
      for (int bit = 0; bit < l; ++bit) r |= (((j % n) >> bit) & 1) << (l - 1 - bit);
      dst[l][r + (j - j % n)] = c.points[(j % n) * 2 * s + s - 1];
    }
  }
  for (int i = 0; i < kMapSize; ++i) {
    const uint32_t b = Bits(c.qmap[i]);
    for (int k = 0; k < 4; ++k) c.plane[k][i] = static_cast<uint8_t>(b >> (8 * k));
  }
}

// bfloat16 <-> float32 as XLA converts: widening is exact; narrowing rounds to nearest, ties to
// even (a NaN stays a NaN, quieted).
[[gnu::always_inline]] inline float Widen(uint16_t h) { return FromBits(uint32_t{h} << 16); }

[[gnu::always_inline]] inline uint16_t Narrow(float x) {
  const uint32_t b = Bits(x);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const bool nan = (b & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((b >> 16) | 0x40u) : rounded);
}

// x rounded to bfloat16 (as a float32): what a cast to bfloat16 in the pure chain keeps.
[[gnu::always_inline]] inline float RoundBf16(float x) { return Widen(Narrow(x)); }

template <bool kBf16>
[[gnu::always_inline]] inline float LoadP(const void* base, int64_t i) {
  if constexpr (kBf16) {
    return Widen(static_cast<const uint16_t*>(base)[i]);
  } else {
    return static_cast<const float*>(base)[i];
  }
}

template <bool kBf16>
[[gnu::always_inline]] inline void StoreP(void* base, int64_t i, float x) {
  if constexpr (kBf16) {
    static_cast<uint16_t*>(base)[i] = Narrow(x);
  } else {
    static_cast<float*>(base)[i] = x;
  }
}

// where(den != 0, num / den, 0): a zero divisor gives 0, a NaN divisor NaN.
[[gnu::always_inline]] inline float SafeDiv(float num, float den) {
  const bool ok = den != 0.0f;
  const float r = num / (ok ? den : 1.0f);
  return ok ? r : 0.0f;
}

// rmsjax._numerics.moment_div: SafeDiv, and 0 where the divisor is +inf (an overflowed second
// moment) while the gradient is finite, even when the numerator overflowed too (inf / inf).
[[gnu::always_inline]] inline float MomentDiv(float num, float den, float g) {
  const float r = SafeDiv(num, den);
  return (den == INFINITY && std::isfinite(g)) ? 0.0f : r;
}

// where(den2 != 0, g * rsqrt(den2), 0), rsqrt as 1 / sqrt (correctly rounded).
[[gnu::always_inline]] inline float SafeRsqrtScale(float g, float den2) {
  const bool ok = den2 != 0.0f;
  const float r = g * (1.0f / std::sqrt(ok ? den2 : 1.0f));
  return ok ? r : 0.0f;
}

// Arithmetic with the fused multiply-adds where XLA's CPU code has them. The build passes
// -ffp-contract=off, so the compiler fuses nothing on its own: every fused multiply-add of the
// kernel is one of these calls, placed where XLA's code (LLVM's DAG combiner, after XLA's
// fusion pass) fuses one, as read from its object code for each pure chain (jax 0.6.1 and
// 0.10.2). A CPU without FMA rounds the product and the sum separately, as XLA does there.
template <bool kHasFma>
struct Arith {
  // round(a * b + c): one rounding on an FMA CPU, two otherwise
  [[gnu::always_inline]] static inline float Fma(float a, float b, float c) {
    if constexpr (kHasFma) {
      return __builtin_fmaf(a, b, c);
    } else {
      return a * b + c;
    }
  }
};

// The moving average (1 - d) * x + d * old, given both weights, with one of the two products
// fused: XLA's code fuses the new sample's product when the sample is a float32 value, the old
// average's when it is a bfloat16 gradient widened inside the same loop (kOldFirst).
template <class A, bool kOldFirst>
[[gnu::always_inline]] inline float Ema(float w_new, float x, float w_old, float old) {
  if constexpr (kOldFirst) {
    return A::Fma(w_old, old, w_new * x);
  } else {
    return A::Fma(w_new, x, w_old * old);
  }
}

// x where mask is all ones, +0 where it is 0 (a term that is absent contributes an exact zero).
[[gnu::always_inline]] inline float Keep(float x, uint32_t mask) { return FromBits(Bits(x) & mask); }

// a where mask is all ones, b where it is 0. The loops choose by masks, not by branches on a
// flag: the compiler vectorises bit operations, while a branch on a flag in the loop keeps it
// scalar.
[[gnu::always_inline]] inline float Choose(uint32_t mask, float a, float b) {
  return static_cast<int32_t>(mask) < 0 ? a : b;
}

// Ema with the fused product chosen at run time (old_first: a mask): both are computed.
template <class A>
[[gnu::always_inline]] inline float EmaEither(float w_new, float x, float w_old, float old,
                                              uint32_t old_first) {
  const float a = A::Fma(w_old, old, w_new * x);
  const float b = A::Fma(w_new, x, w_old * old);
  return Choose(old_first, a, b);
}

// The constants of one call: the kind's scalars, and what Derive makes of its flags for the
// linear terms around the rule (see DECAY_FLAGS in rmsjax/_native/table.py). A term that is
// absent is computed with an exact zero (Keep, and a coefficient of -0: g + (-0 * +0) is g for
// every g, -0 included), so one loop serves every combination of the terms.
struct Consts {
  float sc[tbl::kMaxScalars] = {};
  // rms, sgd: the step size applied before the momentum buffer and after it (one of the two
  // is 1: scale_first puts the step size inside the buffer); without momentum, pre.
  float pre = 0.0f, post = 0.0f;
  float sign = 1.0f;  // -1 with maximize
  // the coefficient of each decay term; the terms before the step size are computed with a
  // coefficient of -0 and a mask that keeps p (0 where absent), the decoupled term is selected
  float coupled = -0.0f, after_rule = -0.0f, decoupled = 0.0f;
  uint32_t coupled_mask = 0, after_rule_mask = 0;
  // the run-time choices of the loops, as masks (all ones: true; see Choose)
  uint32_t decay_bf16 = 0;  // bf16: the decay product is a bfloat16 multiplication
  uint32_t has_decoupled = 0;
  // the decoupled term fuses the step size's product (a step size follows the rule or the
  // buffer) rather than the decay's (the buffer's output is the update, scale_first)
  uint32_t step_fused = ~0u;
  // which product of each moving average XLA's code fuses (see Ema), when the linear terms
  // change the program around the rule (the extras loops; see MovingAverageOrder)
  uint32_t mu_old_first = 0, nu_old_first = 0;
};

// ---- the rules, one element at a time ---------------------------------------------------------
// Step<A>(g, p, s, c) takes the gradient and parameter (widened to float32), the element's old
// state in s[slot] (decoded when quantized), and returns the new parameter, leaving the new
// state in s[slot]; A places the fused multiply-adds (Arith). With kBf16 it rounds to bfloat16
// exactly where the pure chain (the rule, then scale_by_learning_rate etc. on bfloat16
// updates, then apply_updates) does, as XLA's CPU compiler executes it: every cast of an update
// to the gradient's dtype rounds (map_rule), a bfloat16 multiplication or addition rounds where
// its result feeds another bfloat16 operation, and does NOT round where its only use is a
// conversion back to float32 (XLA's float normalisation computes such an operation in float32
// and drops the conversion pair). With kExtras the loop also runs the linear terms the presets
// put around the rule (maximize, the coupled and decoupled decays; adam's loops all have optax's
// weight_decay term), each an exact no-op where its flag is
// off (see Consts); without, the loop has none of their arithmetic.

// The gradient as the rule receives it: negated with maximize, plus the coupled decay term.
// float32: fma(wd, p, g); bfloat16 with a weakly typed coefficient: g + bf16(wd * p), a float32
// sum that is not rounded (its only use is the rule's widening); bfloat16 with a float32
// coefficient: the float32 fma, cast back to bfloat16 by the decay's map_rule.
template <class A, bool kBf16>
[[gnu::always_inline]] inline float Prologue(float g, float p, const Consts& c) {
  g = g * c.sign;  // exact
  const float pm = Keep(p, c.coupled_mask);
  if constexpr (kBf16) {
    const float weak = g + RoundBf16(c.coupled * pm);
    const float wide = RoundBf16(A::Fma(c.coupled, pm, g));
    return Choose(c.decay_bf16, weak, wide);
  } else {
    return A::Fma(c.coupled, pm, g);
  }
}

// adam's weight_decay term, u + wd * p after the rule (its update r already cast to the
// gradient's dtype): float32 fma; bfloat16: two bfloat16 operations with a weakly typed
// coefficient, else the float32 fma cast back. Every adam loop has it (see AdamRule).
template <class A, bool kBf16>
[[gnu::always_inline]] inline float AfterRule(float r, float p, const Consts& c) {
  const float pm = Keep(p, c.after_rule_mask);
  if constexpr (kBf16) {
    const float weak = RoundBf16(r + RoundBf16(c.after_rule * pm));
    const float wide = RoundBf16(A::Fma(c.after_rule, pm, r));
    return Choose(c.decay_bf16, weak, wide);
  } else {
    return A::Fma(c.after_rule, pm, r);
  }
}

// The new parameter p + step * v, where step * v is the chain's last scaling (the step size
// times the rule's update, or times the momentum buffer's output), and, with the decoupled
// decay, - wd * p after it. float32: fma(step, v, p); with the decay, the step product rounded
// and the decay product fused: p + fma(-wd, p, step * v). bfloat16 (v already cast to
// bfloat16 where the chain casts it): the step product is a bfloat16 product; the decay, with a
// weakly typed coefficient, two more bfloat16 operations, else one float32 fma (the step
// product fused, the decay product rounded, as XLA's code has it) cast back.
template <class A, bool kBf16, bool kExtras>
[[gnu::always_inline]] inline float Epilogue(float step, float v, float p, const Consts& c) {
  if constexpr (kBf16) {
    const float u = RoundBf16(step * v);
    if constexpr (kExtras) {
      const float dp = c.decoupled * p;
      const float weak = RoundBf16(u - RoundBf16(dp));
      const float wide =
          RoundBf16(Choose(c.step_fused, A::Fma(step, v, -dp), A::Fma(-c.decoupled, p, u)));
      return p + Choose(c.has_decoupled, Choose(c.decay_bf16, weak, wide), u);
    } else {
      return p + u;
    }
  } else {
    if constexpr (kExtras) {
      const float d = p + Choose(c.step_fused, A::Fma(step, v, -(c.decoupled * p)),
                                 A::Fma(-c.decoupled, p, step * v));
      return Choose(c.has_decoupled, d, A::Fma(step, v, p));
    } else {
      return A::Fma(step, v, p);
    }
  }
}

// The momentum buffer (trace) and the step size in the chain's order, then the epilogue: with
// the step size first (scale_first: c.pre = lr, c.post = 1) m = beta m + lr r, else (c.pre = 1,
// c.post = lr) m = beta m + r and lr times trace's output; beta's product fused, as XLA does.
// Without momentum, p + lr r.
template <class A, bool kMomentum, bool kNesterov, bool kBf16, bool kExtras, int kTrace>
[[gnu::always_inline]] inline float StepAndTrace(float r, float p, float* s, const float beta,
                                                 const Consts& c) {
  if constexpr (kMomentum) {
    const float t = c.pre * r;  // bf16: not rounded (its only use is trace's widening)
    const float m = A::Fma(beta, s[kTrace], t);
    s[kTrace] = m;
    float v = kNesterov ? A::Fma(beta, m, t) : m;
    if constexpr (kBf16) v = RoundBf16(v);  // trace's update, cast to bfloat16
    return Epilogue<A, kBf16, kExtras>(c.post, v, p, c);
  } else {
    return Epilogue<A, kBf16, kExtras>(c.pre, r, p, c);
  }
}

// rmsprop family: [maximize], [coupled decay], scale_by_[centered_]rms, scale_by_learning_rate
// and [trace] in either order, [decoupled decay].
template <bool kCentered, bool kEpsInSqrt, bool kMomentum, bool kNesterov, bool kExtras,
          bool kBf16, bool kMuOldFirst, bool kNuOldFirst>
struct RmsRule {
  static constexpr bool kExtrasLoop = kExtras;  // (see Dispatch)
  static constexpr bool kHas[tbl::kMaxSlots] = {kCentered, true, kMomentum};
  static_assert(tbl::rms::slot::kMu == 0 && tbl::rms::slot::kNu == 1 &&
                    tbl::rms::slot::kTrace == 2,
                "rms: kHas follows the table's slot order");

  template <class A>
  [[gnu::always_inline]] static inline float Step(float gi, float pi, float* s,
                                                  const Consts& c) {
    namespace S = tbl::rms::scalar;
    namespace T = tbl::rms::slot;
    const float omd = c.sc[S::kOneMinusDecay], decay = c.sc[S::kDecay], eps = c.sc[S::kEps];
    // Divisions by the bias correction stay divisions: XLA keeps them so wherever the scalar
    // divides more than one array (every tree of two or more leaves, and the centered form's
    // two moments). Only for a tree of a single leaf does its algebraic simplifier rewrite the
    // lone A / broadcast(c) as A * broadcast(1 / c), an ulp away (see the contract "bias
    // correction" in rmsjax/_native/contracts.py).
    const float corr = c.sc[S::kCorrection];
    const float beta = c.sc[S::kMomentum];
    float g = gi;
    if constexpr (kExtras) g = Prologue<A, kBf16>(gi, pi, c);
    const float nu = kExtras ? EmaEither<A>(omd, g * g, decay, s[T::kNu], c.nu_old_first)
                             : Ema<A, kNuOldFirst>(omd, g * g, decay, s[T::kNu]);
    float var;
    if constexpr (kCentered) {
      const float mu = kExtras ? EmaEither<A>(omd, g, decay, s[T::kMu], c.mu_old_first)
                               : Ema<A, kMuOldFirst>(omd, g, decay, s[T::kMu]);
      // (two divisions by one scalar: XLA keeps them divisions)
      const float nh = nu / corr;
      const float mh = mu / corr;
      const float d = A::Fma(-mh, mh, nh);
      // where(nu_hat == +inf, +inf, max(d, 0)); a NaN d stays NaN, like jnp.maximum
      var = nh == kInf ? kInf : (d < 0.0f ? 0.0f : d);
      s[T::kMu] = mu;
    } else {
      var = nu / corr;
    }
    s[T::kNu] = nu;
    float r;
    if constexpr (kEpsInSqrt) {
      r = SafeRsqrtScale(g, var + eps);
    } else {
      r = SafeDiv(g, std::sqrt(var) + eps);
    }
    if constexpr (kBf16) r = RoundBf16(r);  // scale_by_rms's update, cast to bfloat16
    return StepAndTrace<A, kMomentum, kNesterov, kBf16, kExtras, T::kTrace>(r, pi, s, beta, c);
  }
};

// adam family: [maximize], [coupled decay], scale_by_adam (kForm: plain, nesterov, or Keras'
// epsilon-hat form scale_by_adam_eps_hat), [weight decay], scale_by_learning_rate,
// [decoupled decay].
constexpr int kAdamPlain = 0, kAdamNesterov = 1, kAdamEpsHat = 2;

template <int kForm, bool kExtras, bool kBf16, bool kMuOldFirst, bool kNuOldFirst>
struct AdamRule {
  static constexpr bool kExtrasLoop = kExtras;  // (see Dispatch)
  static constexpr bool kHas[tbl::kMaxSlots] = {true, true, false};
  static_assert(tbl::adam::slot::kMu == 0 && tbl::adam::slot::kNu == 1,
                "adam: kHas follows the table's slot order");

  template <class A>
  [[gnu::always_inline]] static inline float Step(float gi, float pi, float* s,
                                                  const Consts& c) {
    namespace S = tbl::adam::scalar;
    namespace T = tbl::adam::slot;
    const float omb1 = c.sc[S::kOneMinusB1], b1 = c.sc[S::kB1];
    const float omb2 = c.sc[S::kOneMinusB2], b2 = c.sc[S::kB2];
    const float eps = c.sc[S::kEps], eps_root = c.sc[S::kEpsRoot];
    // the bias corrections: divisions, as XLA keeps them in a tree of several leaves (see
    // RmsRule)
    const float c1 = c.sc[S::kC1], c2 = c.sc[S::kC2], c1n = c.sc[S::kC1Next];
    const float lr = c.sc[S::kStepSize];
    float g = gi;
    if constexpr (kExtras) g = Prologue<A, kBf16>(gi, pi, c);
    const float mu = kExtras ? EmaEither<A>(omb1, g, b1, s[T::kMu], c.mu_old_first)
                             : Ema<A, kMuOldFirst>(omb1, g, b1, s[T::kMu]);
    const float nu = kExtras ? EmaEither<A>(omb2, g * g, b2, s[T::kNu], c.nu_old_first)
                             : Ema<A, kNuOldFirst>(omb2, g * g, b2, s[T::kNu]);
    s[T::kMu] = mu;
    s[T::kNu] = nu;
    float r;
    if constexpr (kForm == kAdamEpsHat) {
      // alpha m / (sqrt(nu) + eps); |m alpha| cannot overflow (see scale_by_adam_eps_hat)
      r = SafeDiv(mu * c.sc[S::kAlpha], std::sqrt(nu) + eps);
    } else {
      const float den = std::sqrt(nu / c2 + eps_root) + eps;
      if constexpr (kForm == kAdamNesterov) {
        r = MomentDiv(A::Fma(b1, mu / c1n, omb1 * (g / c1)), den, g);
      } else {
        // (mu / c1) / den: XLA's simplifier computes it as mu / (c1 * den) (one division);
        // the guards are MomentDiv's, on den
        const bool ok = den != 0.0f;
        const float q = mu / (c1 * (ok ? den : 1.0f));
        r = (den == kInf && std::isfinite(g)) ? 0.0f : (ok ? q : 0.0f);
      }
    }
    if constexpr (kBf16) r = RoundBf16(r);  // the rule's update, cast to bfloat16
    // optax's AdamW decay: in every adam loop (an exact no-op without the flag), so AdamW, the
    // most common configuration, runs the loop without the other terms' arithmetic
    r = AfterRule<A, kBf16>(r, pi, c);
    return Epilogue<A, kBf16, kExtras>(lr, r, pi, c);
  }
};

// sgd: [maximize], [coupled decay], [trace] and scale_by_learning_rate in either order,
// [decoupled decay].
template <bool kMomentum, bool kNesterov, bool kExtras, bool kBf16>
struct SgdRule {
  static constexpr bool kExtrasLoop = kExtras;  // (see Dispatch)
  static constexpr bool kHas[tbl::kMaxSlots] = {kMomentum, false, false};
  static_assert(tbl::sgd::slot::kTrace == 0, "sgd: kHas follows the table's slot order");

  template <class A>
  [[gnu::always_inline]] static inline float Step(float gi, float pi, float* s,
                                                  const Consts& c) {
    float g = gi;
    if constexpr (kExtras) {
      g = Prologue<A, kBf16>(gi, pi, c);
      // bf16 without momentum: the decay's sum feeds the bfloat16 product by the step size, so
      // its cast to bfloat16 stays (an exact no-op without the term)
      if constexpr (kBf16 && !kMomentum) g = RoundBf16(g);
    }
    const float beta = c.sc[tbl::sgd::scalar::kMomentum];
    return StepAndTrace<A, kMomentum, kNesterov, kBf16, kExtras, tbl::sgd::slot::kTrace>(
        g, pi, s, beta, c);
  }
};

// ---- 8-bit blocks: decode, encode -------------------------------------------------------------

// The code of a normalised value v (|v| <= 1, not NaN): #(breakpoints <= v), as the JAX codec's
// lookup counts it (rmsjax.quantization.rounding), found with the cell table (what its cells
// are: the codec operand's fields in rmsjax/_native/table.py; restated in NumPy by
// rmsjax._native.codecs.lookup_model).
[[gnu::always_inline]] inline int Lookup(const Codec& c, float v) {
  const uint32_t b = Bits(v);
  uint32_t a = b & 0x7fffffffu;
  a = a < c.lo_bits ? c.lo_bits : a;
  a = a > 0x3f800000u ? 0x3f800000u : a;
  const int k = static_cast<int>((a - c.lo_bits) >> c.shift);
  const int cell = (b >> 31) ? c.half - 1 - k : c.half + k;
  const int base = c.cells[cell];
  return base + (c.points[base] <= v ? 1 : 0);
}

// x[i] = qmap[codes[i]] * scale: the codec's decode (a float32 product).
[[gnu::always_inline]] inline void Decode(const Codec& c, const uint8_t* codes, float scale,
                                          int len, float* x) {
  for (int i = 0; i < len; ++i) x[i] = c.qmap[codes[i]] * scale;
}

// The codec's encode of one block x[0..len) (storage.encode: values beyond float32 clipped to
// +-max; the scale is the largest magnitude, NaN when the block holds a NaN; v = x / scale, by a
// true division, with 1 in place of a zero scale; a NaN v takes the code of -1).
// One entry of a block being encoded: x clipped to +-max (NaN stays NaN), its magnitude folded
// into the block's largest magnitude and NaN flag.
[[gnu::always_inline]] inline float ClipAndTrack(float x, float& amax, bool& nan) {
  const float xi = std::min(std::max(x, -kF32Max), kF32Max);
  const float m = std::fabs(xi);
  nan |= m != m;
  amax = m > amax ? m : amax;
  return xi;
}

// A block's scale (its largest magnitude, NaN when it holds a NaN) and the divisor of its
// entries (the scale, 1 in place of 0).
[[gnu::always_inline]] inline float BlockScale(float amax, bool nan) {
  return nan ? std::numeric_limits<float>::quiet_NaN() : amax;
}
[[gnu::always_inline]] inline float BlockDivisor(float scale) {
  return scale == 0.0f ? 1.0f : scale;
}

[[gnu::always_inline]] inline void Encode(const Codec& c, float* x, int len, uint8_t* codes,
                                          float* scale_out) {
  float amax = 0.0f;
  bool nan = false;
  for (int i = 0; i < len; ++i) x[i] = ClipAndTrack(x[i], amax, nan);
  const float scale = BlockScale(amax, nan);
  const float div = BlockDivisor(scale);
  for (int i = 0; i < len; ++i) {
    float v = x[i] / div;
    v = v != v ? -1.0f : v;
    codes[i] = static_cast<uint8_t>(Lookup(c, v));
  }
  *scale_out = scale;
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RMSJAX_HAVE_AVX2_VERSION 1

// Decode and Encode, eight entries at a time with AVX2 (gathers for the map, the cell table and
// the breakpoints); the same operations, hence the same results, as the scalar versions above.
[[gnu::target("avx2,fma")]] void DecodeAvx2(const Codec& c, const uint8_t* codes, float scale,
                                            int len, float* x) {
  const __m256 s = _mm256_set1_ps(scale);
  int i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i));
    const __m256 q = _mm256_i32gather_ps(c.qmap, _mm256_cvtepu8_epi32(raw), 4);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(q, s));
  }
  for (; i < len; ++i) x[i] = c.qmap[codes[i]] * scale;
}

[[gnu::target("avx2,fma")]] void EncodeAvx2(const Codec& c, float* x, int len, uint8_t* codes,
                                            float* scale_out) {
  const __m256 lo = _mm256_set1_ps(-kF32Max), hi = _mm256_set1_ps(kF32Max);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  __m256 vnan = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= len; i += 8) {
    // max(lo, x) and min(hi, .) return x when x is NaN (the second operand)
    const __m256 xi = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(x + i)));
    _mm256_storeu_ps(x + i, xi);
    const __m256 m = _mm256_and_ps(xi, abs_mask);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(m, m, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(m, vmax);  // a NaN m gives vmax (the second operand)
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float v : lanes) amax = v > amax ? v : amax;
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (int j = i; j < len; ++j) x[j] = ClipAndTrack(x[j], amax, nan);
  const float scale = BlockScale(amax, nan);
  const float div = BlockDivisor(scale);
  const __m256 vdiv = _mm256_set1_ps(div);
  const __m256 minus_one = _mm256_set1_ps(-1.0f);
  const __m256i lo_bits = _mm256_set1_epi32(static_cast<int>(c.lo_bits));
  const __m256i one_bits = _mm256_set1_epi32(0x3f800000);
  const __m256i mag_mask = _mm256_set1_epi32(0x7fffffff);
  const __m128i shift = _mm_cvtsi32_si128(c.shift);
  const __m256i pos_base = _mm256_set1_epi32(c.half);
  const __m256i neg_base = _mm256_set1_epi32(c.half - 1);
  const __m256i byte = _mm256_set1_epi32(0xff);
  const auto* cells = reinterpret_cast<const int*>(c.cells.data());
  // bytes 0, 4, 8, 12 of each 128-bit lane to its first 4 bytes, then lanes 0 and 1 together
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, -1);
  const __m256i join = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
  int k = 0;
  for (; k + 8 <= len; k += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + k), vdiv);
    v = _mm256_blendv_ps(v, minus_one, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i b = _mm256_castps_si256(v);
    __m256i a = _mm256_and_si256(b, mag_mask);
    a = _mm256_min_epu32(_mm256_max_epu32(a, lo_bits), one_bits);
    const __m256i cell_k = _mm256_srl_epi32(_mm256_sub_epi32(a, lo_bits), shift);
    const __m256i negative = _mm256_srai_epi32(b, 31);
    const __m256i cell = _mm256_blendv_epi8(_mm256_add_epi32(pos_base, cell_k),
                                            _mm256_sub_epi32(neg_base, cell_k), negative);
    const __m256i base = _mm256_and_si256(_mm256_i32gather_epi32(cells, cell, 1), byte);
    const __m256 point = _mm256_i32gather_ps(c.points, base, 4);
    const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(point, v, _CMP_LE_OQ));
    const __m256i code = _mm256_sub_epi32(base, up);  // up is -1 where the breakpoint is <= v
    const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(code, pick), join);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + k), _mm256_castsi256_si128(packed));
  }
  for (; k < len; ++k) {
    float v = x[k] / div;
    v = v != v ? -1.0f : v;
    codes[k] = static_cast<uint8_t>(Lookup(c, v));
  }
  *scale_out = scale;
}
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RMSJAX_HAVE_AVX512_VERSION 1
#define RMSJAX_AVX512 "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,gfni,avx2,fma"

// Decode and Encode, sixteen entries at a time with AVX-512 and no gathers: the map is read
// with in-register permutes (32 entries per permute, the code's top three bits choose among
// eight), and the code of v is found by a branch-free binary search over the breakpoints whose
// levels are permutes of the Codec's level tables. The search counts the breakpoints <= v as
// Lookup does (the breakpoints are sorted; points[255] = +inf is never compared), so the codes
// are Lookup's. A short block's tail is handled with masked loads and stores.

[[gnu::target(RMSJAX_AVX512)]] inline __mmask16 TailMask(int left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
}

// x[i] = qmap[codes[i]] * scale for 64 codes at a time: each byte of the map's values is read
// by two byte permutes (128 entries each; the code's top bit chooses), the four bytes are
// interleaved into float32 values by unpacks (which work within 128-bit lanes, so the codes are
// first permuted into the order the unpacks undo), and multiplied by the scale.
[[gnu::target(RMSJAX_AVX512)]] void DecodeAvx512(const Codec& c, const uint8_t* codes,
                                                 float scale, int len, float* x) {
  __m512i lo[4], hi[4];
  for (int k = 0; k < 4; ++k) {
    lo[k] = _mm512_load_si512(c.plane[k]);
    hi[k] = _mm512_load_si512(c.plane[k] + 64);
  }
  __m512i lo2[4], hi2[4];
  for (int k = 0; k < 4; ++k) {
    lo2[k] = _mm512_load_si512(c.plane[k] + 128);
    hi2[k] = _mm512_load_si512(c.plane[k] + 192);
  }
  // byte 16 * lane + 4 * r + d of the permuted codes is code 16 * r + 4 * lane + d: after the
  // unpacks, dword d of 128-bit lane `lane` of result r is then entry 16 * r + 4 * lane + d
  alignas(64) uint8_t order[64];
  for (int lane = 0; lane < 4; ++lane) {
    for (int r = 0; r < 4; ++r) {
      for (int d = 0; d < 4; ++d) order[16 * lane + 4 * r + d] = 16 * r + 4 * lane + d;
    }
  }
  const __m512i perm = _mm512_load_si512(order);
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < len; i += 64) {
    const int left = len - i;
    const __mmask64 m = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    const __m512i idx = _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi8(m, codes + i));
    const __mmask64 top = _mm512_movepi8_mask(idx);  // codes 128..255
    __m512i b[4];
    for (int k = 0; k < 4; ++k) {
      b[k] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(lo[k], idx, hi[k]),
                                    _mm512_permutex2var_epi8(lo2[k], idx, hi2[k]));
    }
    const __m512i w0 = _mm512_unpacklo_epi8(b[0], b[1]), w1 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i w2 = _mm512_unpacklo_epi8(b[2], b[3]), w3 = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i f[4] = {_mm512_unpacklo_epi16(w0, w2), _mm512_unpackhi_epi16(w0, w2),
                          _mm512_unpacklo_epi16(w1, w3), _mm512_unpackhi_epi16(w1, w3)};
    for (int r = 0; r < 4; ++r) {
      const __mmask16 mr = TailMask(left - 16 * r);
      if (left - 16 * r <= 0) break;
      _mm512_mask_storeu_ps(x + i + 16 * r, mr, _mm512_mul_ps(_mm512_castsi512_ps(f[r]), s));
    }
  }
}

// The code of each lane of v (|v| <= 1, not NaN): #(breakpoints <= v), by a branch-free binary
// search. Level l compares v with one breakpoint chosen by the l results before it, and its
// result is bit 7 - l of the code. The results are gathered in r in reverse order (level l's
// in bit l), so that r's low bits, which the permutes read, hold all the results so far without
// a shift; the levels' tables are stored in that order, levels 6 and 7 (64 and 128 entries)
// choose among their 32-entry permutes with the results of levels 5 and 6, and the code is r
// with its bits reversed (one GFNI affine transform per byte).
struct Levels512 {
  __m512 l[5], l5[2], l6[4], l7[8];
};

[[gnu::target(RMSJAX_AVX512)]] [[gnu::always_inline]] inline __m512i Search512(
    const Levels512& t, __m512 v) {
  __mmask16 m = _mm512_cmp_ps_mask(t.l[0], v, _CMP_LE_OQ);  // level 0: the same breakpoint
  __m512i r = _mm512_maskz_mov_epi32(m, _mm512_set1_epi32(1));
  for (int l = 1; l < 5; ++l) {  // at most 16 candidates: one permute
    m = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(r, t.l[l]), v, _CMP_LE_OQ);
    r = _mm512_mask_or_epi32(r, m, r, _mm512_set1_epi32(1 << l));
  }
  m = _mm512_cmp_ps_mask(_mm512_permutex2var_ps(t.l5[0], r, t.l5[1]), v, _CMP_LE_OQ);
  const __mmask16 m5 = m;
  r = _mm512_mask_or_epi32(r, m, r, _mm512_set1_epi32(32));
  m = _mm512_cmp_ps_mask(_mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t.l6[0], r, t.l6[1]),
                                              _mm512_permutex2var_ps(t.l6[2], r, t.l6[3])),
                         v, _CMP_LE_OQ);
  const __mmask16 m6 = m;
  r = _mm512_mask_or_epi32(r, m, r, _mm512_set1_epi32(64));
  const __m512 p01 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t.l7[0], r, t.l7[1]),
                                          _mm512_permutex2var_ps(t.l7[2], r, t.l7[3]));
  const __m512 p23 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t.l7[4], r, t.l7[5]),
                                          _mm512_permutex2var_ps(t.l7[6], r, t.l7[7]));
  m = _mm512_cmp_ps_mask(_mm512_mask_blend_ps(m6, p01, p23), v, _CMP_LE_OQ);
  r = _mm512_mask_or_epi32(r, m, r, _mm512_set1_epi32(128));
  // reverse the bits of each byte (r < 256, so the other bytes stay 0)
  return _mm512_gf2p8affine_epi64_epi8(r, _mm512_set1_epi64(0x8040201008040201LL), 0);
}

[[gnu::target(RMSJAX_AVX512)]] void EncodeAvx512(const Codec& c, float* x, int len,
                                                 uint8_t* codes, float* scale_out) {
  const __m512 lo = _mm512_set1_ps(-kF32Max), hi = _mm512_set1_ps(kF32Max);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int i = 0; i < len; i += 16) {
    const __mmask16 m = TailMask(len - i);
    // max(lo, x) and min(hi, .) return x when x is NaN (the second operand); lanes past the
    // end are 0
    const __m512 xi = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_maskz_loadu_ps(m, x + i)));
    _mm512_mask_storeu_ps(x + i, m, xi);
    const __m512 a = _mm512_abs_ps(xi);
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(a, vmax);  // a NaN magnitude gives vmax (the second operand)
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const float scale = BlockScale(amax, nan != 0);
  const float div = BlockDivisor(scale);
  Levels512 t;
  for (int l = 0; l < 5; ++l) t.l[l] = _mm512_load_ps(c.level[l]);
  t.l[0] = _mm512_set1_ps(c.level[0][0]);
  for (int r = 0; r < 2; ++r) t.l5[r] = _mm512_load_ps(c.level5 + 16 * r);
  for (int r = 0; r < 4; ++r) t.l6[r] = _mm512_load_ps(c.level6 + 16 * r);
  for (int r = 0; r < 8; ++r) t.l7[r] = _mm512_load_ps(c.level7 + 16 * r);
  if (nan != 0) {  // every v is NaN: the code of -1
    std::memset(codes, Lookup(c, -1.0f), static_cast<size_t>(len));
    *scale_out = scale;
    return;
  }
  // no x is NaN, so every v = x / div is a number of [-1, 1]
  const __m512 vdiv = _mm512_set1_ps(div);
  for (int k = 0; k < len; k += 16) {
    const __mmask16 m = TailMask(len - k);
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), vdiv);
    _mm_mask_storeu_epi8(codes + k, m, _mm512_cvtepi32_epi8(Search512(t, v)));
  }
  *scale_out = scale;
}
#endif

// ---- the loops ----------------------------------------------------------------------------------

// Float32 state: elements [lo, hi) of one leaf. The constants are copied to the stack first, so
// the compiler knows no store of the loop changes them.
template <class R, bool kBf16, class A>
[[gnu::always_inline]] inline void DenseLoop(const Leaf& L, int64_t lo, int64_t hi,
                                             const Consts& consts) {
  const Consts c = consts;
  const float* in[tbl::kMaxSlots];
  float* out[tbl::kMaxSlots];
  for (int k = 0; k < tbl::kMaxSlots; ++k) {
    in[k] = L.s_in[k];
    out[k] = L.s_out[k];
  }
  const void* p = L.p;
  const void* g = L.g;
  void* p_out = L.p_out;
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    float s[tbl::kMaxSlots] = {};
    for (int k = 0; k < tbl::kMaxSlots; ++k) {
      if (R::kHas[k]) s[k] = in[k][i];
    }
    const float pn = R::template Step<A>(LoadP<kBf16>(g, i), LoadP<kBf16>(p, i), s, c);
    for (int k = 0; k < tbl::kMaxSlots; ++k) {
      if (R::kHas[k]) out[k][i] = s[k];
    }
    StoreP<kBf16>(p_out, i, pn);
  }
}

// 8-bit state: blocks [lo, hi) of one leaf (block b is block b % nb of row b / nb). Per block:
// decode every slot into a stack buffer, run the rule (parameters written at once), then
// requantise each slot from the buffer: one pass over the leaf's memory.
template <class R, bool kBf16, int kIsa, class A>
[[gnu::always_inline]] inline void BlockLoop(const Leaf& L, int64_t lo, int64_t hi,
                                             const Consts& consts, const Codec* codecs) {
  const Consts c = consts;
  alignas(32) float buf[tbl::kMaxSlots][kMaxBlock];
  const int block = codecs[0].block;  // the same for every slot (checked by Prepare)
  for (int64_t b = lo; b < hi; ++b) {
    const int64_t row = b / L.nb;
    const int64_t j = b - row * L.nb;
    const int64_t start = row * L.cols + j * block;
    const int len = static_cast<int>(std::min<int64_t>(block, L.cols - j * block));
    for (int k = 0; k < tbl::kMaxSlots; ++k) {
      if (!R::kHas[k]) continue;
#ifdef RMSJAX_HAVE_AVX512_VERSION
      if constexpr (kIsa == kIsaAvx512) {
        DecodeAvx512(codecs[k], L.c_in[k] + start, L.sc_in[k][b], len, buf[k]);
        continue;
      }
#endif
#ifdef RMSJAX_HAVE_AVX2_VERSION
      if constexpr (kIsa == kIsaAvx2) {
        DecodeAvx2(codecs[k], L.c_in[k] + start, L.sc_in[k][b], len, buf[k]);
        continue;
      }
#endif
      Decode(codecs[k], L.c_in[k] + start, L.sc_in[k][b], len, buf[k]);
    }
    const void* p = L.p;
    const void* g = L.g;
    void* p_out = L.p_out;
#pragma GCC ivdep
    for (int i = 0; i < len; ++i) {
      float s[tbl::kMaxSlots] = {};
      for (int k = 0; k < tbl::kMaxSlots; ++k) {
        if (R::kHas[k]) s[k] = buf[k][i];
      }
      const float pn =
          R::template Step<A>(LoadP<kBf16>(g, start + i), LoadP<kBf16>(p, start + i), s, c);
      for (int k = 0; k < tbl::kMaxSlots; ++k) {
        if (R::kHas[k]) buf[k][i] = s[k];
      }
      StoreP<kBf16>(p_out, start + i, pn);
    }
    for (int k = 0; k < tbl::kMaxSlots; ++k) {
      if (!R::kHas[k]) continue;
#ifdef RMSJAX_HAVE_AVX512_VERSION
      if constexpr (kIsa == kIsaAvx512) {
        EncodeAvx512(codecs[k], buf[k], len, L.c_out[k] + start, L.sc_out[k] + b);
        continue;
      }
#endif
#ifdef RMSJAX_HAVE_AVX2_VERSION
      if constexpr (kIsa == kIsaAvx2) {
        EncodeAvx2(codecs[k], buf[k], len, L.c_out[k] + start, L.sc_out[k] + b);
        continue;
      }
#endif
      Encode(codecs[k], buf[k], len, L.c_out[k] + start, L.sc_out[k] + b);
    }
  }
}

// One loop: a rule, its parameter dtype and its state storage. The baseline loops round every
// product and sum separately (x86-64's baseline has no FMA, nor has XLA's code there); the
// AVX2 and AVX-512 loops fuse where XLA's code does (Arith).
template <class R, bool kBf16, bool kQ8>
struct Kernel {
  static constexpr bool kQuantized = kQ8;
  static constexpr bool kBfloat16 = kBf16;
  static constexpr bool kExtras = R::kExtrasLoop;
  template <int kIsa>
  [[gnu::always_inline]] static inline void Loop(const Leaf& L, int64_t lo, int64_t hi,
                                                 const Consts& c, const Codec* codecs) {
    using A = Arith<kIsa != kIsaBaseline>;
    if constexpr (kQ8) {
      BlockLoop<R, kBf16, kIsa, A>(L, lo, hi, c, codecs);
    } else {
      DenseLoop<R, kBf16, A>(L, lo, hi, c);
    }
  }
};

using KernelFn = void (*)(const Leaf&, int64_t, int64_t, const Consts&, const Codec*);

// The compilations of each loop: K::Loop is inlined into each, so the loop is vectorised for
// that function's instruction set.
template <class K>
void Baseline(const Leaf& L, int64_t lo, int64_t hi, const Consts& c, const Codec* codecs) {
  K::template Loop<kIsaBaseline>(L, lo, hi, c, codecs);
}

// The baseline loops of the extras (the presets' terms around the rules) are not vectorised:
// they serve x86-64 CPUs without AVX2 and FMA (before 2013-2015) with the framework presets'
// chains, and vectorising them would cost as much compile time as the rest of the baseline
// loops together.
template <class K>
[[gnu::optimize("no-tree-vectorize")]] void BaselineScalar(const Leaf& L, int64_t lo, int64_t hi,
                                                          const Consts& c, const Codec* codecs) {
  K::template Loop<kIsaBaseline>(L, lo, hi, c, codecs);
}

#ifdef RMSJAX_HAVE_AVX2_VERSION
template <class K>
[[gnu::target("avx2,fma")]] void Avx2Fma(const Leaf& L, int64_t lo, int64_t hi,
                                         const Consts& c, const Codec* codecs) {
  K::template Loop<kIsaAvx2>(L, lo, hi, c, codecs);
}
#endif

#ifdef RMSJAX_HAVE_AVX512_VERSION
template <class K>
[[gnu::target(RMSJAX_AVX512)]] void Avx512(const Leaf& L, int64_t lo, int64_t hi,
                                           const Consts& c, const Codec* codecs) {
  K::template Loop<kIsaAvx512>(L, lo, hi, c, codecs);
}
#endif

// The instruction set of the loops in use: the best the CPU (and OS) supports, lowered by
// RMSJAX_NATIVE_ISA=avx2 (the AVX2+FMA loops even where AVX-512 is present) or =baseline (the
// baseline loops), for testing. AVX-512 (F, BW, DQ, VL, VBMI, GFNI) serves the 8-bit state and
// bfloat16 parameter loops (compute-bound: table searches, bfloat16 rounding); the float32 loops
// are memory-bound and stay AVX2+FMA.
int KernelIsa() {
  static const int isa = [] {
    int best = kIsaBaseline;
#ifdef RMSJAX_HAVE_AVX2_VERSION
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kIsaAvx2;
#ifdef RMSJAX_HAVE_AVX512_VERSION
    if (best == kIsaAvx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
        __builtin_cpu_supports("gfni")) {
      best = kIsaAvx512;
    }
#endif
#endif
    const char* env = std::getenv("RMSJAX_NATIVE_ISA");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return kIsaBaseline;
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return std::min(best, kIsaAvx2);
    return best;
  }();
  return isa;
}

// The compilation of a loop for the CPU: AVX-512 for the 8-bit state and bfloat16 loops (the
// extras loops with bfloat16 parameters and float32 state take AVX2, which costs them little
// and saves their compile time), else AVX2+FMA, else the baseline.
template <class K>
KernelFn Dispatch() {
#ifdef RMSJAX_HAVE_AVX512_VERSION
  if constexpr (K::kQuantized || (K::kBfloat16 && !K::kExtras)) {
    if (KernelIsa() == kIsaAvx512) return Avx512<K>;
  }
#endif
#ifdef RMSJAX_HAVE_AVX2_VERSION
  if (KernelIsa() >= kIsaAvx2) return Avx2Fma<K>;
#endif
  if constexpr (K::kExtras) return BaselineScalar<K>;
  return Baseline<K>;
}

// Runtime choices -> template arguments: Expand<Make, std::integer_sequence<int, N0, N1, ...>>
// ::Get(v) returns Make::Get<v[0], v[1], ...>() for 0 <= v[i] < Ni; exactly those
// combinations are instantiated (a choice of three values is one dimension, not two flags).
template <class Make, class Sizes, int... kVs>
struct Expand;

template <class Make, int... kVs>
struct Expand<Make, std::integer_sequence<int>, kVs...> {
  static KernelFn Get(const int*) { return Make::template Get<kVs...>(); }
};

template <class Make, int kSize, int... kRest, int... kVs>
struct Expand<Make, std::integer_sequence<int, kSize, kRest...>, kVs...> {
  template <int kI>
  static KernelFn From(const int* v) {
    using Next = Expand<Make, std::integer_sequence<int, kRest...>, kVs..., kI>;
    if constexpr (kI + 1 == kSize) {
      return Next::Get(v + 1);
    } else {
      return v[0] == kI ? Next::Get(v + 1) : From<kI + 1>(v);
    }
  }
  static KernelFn Get(const int* v) { return From<0>(v); }
};

// The momentum buffer of a loop: 0 none, 1 heavy ball, 2 Nesterov.
int MomentumForm(bool momentum, bool nesterov) { return momentum ? (nesterov ? 2 : 1) : 0; }

// (Nesterov momentum with the extras is excluded by the table, see Kind.exclusive: no preset
// combines them, and each such loop would cost compile time; a chain that does runs pure JAX.)
struct MakeRms {  // centered, eps_in_sqrt, momentum form, extras, bf16, q8
  template <int kC, int kE, int kM, int kX, int kB, int kQ>
  static KernelFn Get() {
    if constexpr (kM == 2 && kX) {
      return nullptr;
    } else {
      return Dispatch<Kernel<RmsRule<kC, kE, kM != 0, kM == 2, kX, kB, kB && !kQ, kB>, kB, kQ>>();
    }
  }
};
struct MakeAdam {  // form (kAdamPlain, kAdamNesterov, kAdamEpsHat), extras, bf16, q8
  template <int kF, int kX, int kB, int kQ>
  static KernelFn Get() {
    if constexpr (kF == kAdamNesterov && kX) {
      return nullptr;
    } else {
      return Dispatch<Kernel<AdamRule<kF, kX, kB, kB && !kQ, kB>, kB, kQ>>();
    }
  }
};
struct MakeSgd {  // momentum form, extras, bf16, q8
  template <int kM, int kX, int kB, int kQ>
  static KernelFn Get() {
    return Dispatch<Kernel<SgdRule<kM != 0, kM == 2, kX, kB>, kB, kQ>>();
  }
};

// The loop for a kind and its flag bits (the flag names are the table's; the static_asserts
// fail to compile when the table gains a flag these dispatchers do not know). Flags without
// effect in a configuration (nesterov without momentum) are cleared, so equal arithmetic
// shares one loop; the flags of the linear terms around the rule (maximize, the decays,
// decay_bf16) and the order of the step size and the momentum buffer (scale_first) are read at
// run time by the loops (see Consts and Derive), which are compiled once with the maximize,
// coupled and decoupled terms (extras) and once without (adam's weight_decay is in both).
KernelFn PickRms(int64_t f) {
  namespace F = tbl::rms::flag;
  static_assert(F::kAll == (F::kCentered | F::kEpsInSqrt | F::kMomentum | F::kNesterov |
                            F::kScaleFirst | F::kMaximize | F::kCoupledDecay |
                            F::kDecoupledDecay | F::kDecayBf16 | F::kBf16 | F::kQ8),
                "rms: a flag of the table is not dispatched");
  const int v[6] = {(f & F::kCentered) != 0,
                    (f & F::kEpsInSqrt) != 0,
                    MomentumForm(f & F::kMomentum, f & F::kNesterov),
                    (f & (F::kMaximize | F::kCoupledDecay | F::kDecoupledDecay)) != 0,
                    (f & F::kBf16) != 0,
                    (f & F::kQ8) != 0};
  return Expand<MakeRms, std::integer_sequence<int, 2, 2, 3, 2, 2, 2>>::Get(v);
}

KernelFn PickAdam(int64_t f) {
  namespace F = tbl::adam::flag;
  static_assert(F::kAll == (F::kNesterov | F::kEpsHat | F::kMaximize | F::kCoupledDecay |
                            F::kWeightDecay | F::kDecoupledDecay | F::kDecayBf16 | F::kBf16 |
                            F::kQ8),
                "adam: a flag is not dispatched");
  const int form = (f & F::kEpsHat) ? kAdamEpsHat : (f & F::kNesterov) ? kAdamNesterov : kAdamPlain;
  const int64_t extras = F::kMaximize | F::kCoupledDecay | F::kDecoupledDecay;
  const int v[4] = {form, (f & extras) != 0, (f & F::kBf16) != 0, (f & F::kQ8) != 0};
  return Expand<MakeAdam, std::integer_sequence<int, 3, 2, 2, 2>>::Get(v);
}

KernelFn PickSgd(int64_t f) {
  namespace F = tbl::sgd::flag;
  static_assert(F::kAll == (F::kMomentum | F::kNesterov | F::kScaleFirst | F::kMaximize |
                            F::kCoupledDecay | F::kDecoupledDecay | F::kDecayBf16 | F::kBf16 |
                            F::kQ8),
                "sgd: a flag is not dispatched");
  const int v[4] = {MomentumForm(f & F::kMomentum, f & F::kNesterov),
                    (f & (F::kMaximize | F::kCoupledDecay | F::kDecoupledDecay)) != 0,
                    (f & F::kBf16) != 0, (f & F::kQ8) != 0};
  return Expand<MakeSgd, std::integer_sequence<int, 3, 2, 2, 2>>::Get(v);
}

KernelFn Pick(int64_t kind, int64_t flags) {
  static_assert(tbl::kNumKinds == 3, "a kind of the table has no loop here");
  switch (kind) {
    case tbl::rms::kId:
      return PickRms(flags);
    case tbl::adam::kId:
      return PickAdam(flags);
    case tbl::sgd::kId:
      return PickSgd(flags);
    default:
      return nullptr;
  }
}

uint32_t Mask(bool b) { return b ? ~0u : 0u; }

// The linear terms of one call as its loops read them (Consts): the kind's scalars, and what its
// flags make of them (the bits of each term in the kind's own flag enum; 0 where the kind has
// no such term).
struct TermBits {
  int64_t maximize, coupled, after_rule, decoupled, decay_bf16, bf16;
};

void DeriveTerms(int64_t f, const TermBits& bits, float wd, Consts& c) {
  c.sign = (f & bits.maximize) ? -1.0f : 1.0f;
  const bool coupled = (f & bits.coupled) != 0, after_rule = (f & bits.after_rule) != 0;
  c.coupled = coupled ? wd : -0.0f;
  c.coupled_mask = coupled ? ~uint32_t{0} : 0u;
  c.after_rule = after_rule ? wd : -0.0f;
  c.after_rule_mask = after_rule ? ~uint32_t{0} : 0u;
  c.has_decoupled = Mask((f & bits.decoupled) != 0);
  c.decoupled = wd;
  c.decay_bf16 = Mask((f & bits.bf16) != 0 && (f & bits.decay_bf16) != 0);
}

// The step size before and after the momentum buffer: one of the two is the step size, the
// other 1 (a product by 1 is exact); without momentum, pre.
void DeriveSteps(bool momentum, bool scale_first, float lr, Consts& c) {
  const bool after = momentum && !scale_first;
  c.pre = after ? 1.0f : lr;
  c.post = after ? lr : 1.0f;
}

// Which product of each moving average XLA's code fuses when linear terms surround the rule (the
// extras loops; the other loops take it from the template, see Ema and MakeRms), and which
// product the decoupled decay fuses. XLA's fusion pass decides how the chain's operations are
// grouped into loops (and which it recomputes in several), and LLVM then fuses the product that
// comes first in each group's sum, so the choice follows the program around the rule. Measured
// with jax 0.10.2 (XLA's object code, and every choice tried against the pure path), for each
// kind and term, float32 and bfloat16 parameters, float32 and 8-bit state:
//   no terms: the new sample's product for float32 gradients; for bfloat16 ones the old
//     average's (mu with 8-bit state: the new sample's);
//   maximize: XLA folds the sign into the constant weight of the new sample and fuses the old
//     average's product of mu (float32: unless the rule is adam's with a coupled decay and
//     8-bit state, or an RMS rule's with a coupled decay and float32 state);
//   coupled decay, float32: adam's nu fuses the old average (float32 state: XLA recomputes
//     g + wd p in nu's loop); an RMS rule's mu with 8-bit state too;
//   coupled decay with a bfloat16 coefficient, bfloat16 parameters: the sample reaches the
//     averages as a float32 sum; an RMS rule with float32 state then fuses both new samples,
//     8-bit state mu's old average;
//   decoupled decay: the step size's product is fused, except after adam's guarded division
//     (moment_div) with float32 parameters and where no step size follows the momentum buffer
//     (scale_first), where the decay's is.
// Where 8-bit state and a float32 coupled decay meet, XLA computes the moments for the update
// and for their encoding in different loops with different fusions; there the kernel can differ
// from the pure path by a rounding of the update (within the contract's bound, see
// tests/test_fused_differential.py).
void MovingAverageOrder(int64_t kind, bool guarded_division, bool bf16, bool q8, bool maximize,
                        bool coupled, bool momentum_last, Consts& c) {
  const bool rms = kind == tbl::rms::kId, adam = kind == tbl::adam::kId;
  bool mu_old, nu_old;
  if (!bf16 && !q8) {
    mu_old = maximize && !(rms && coupled);
    nu_old = adam && coupled;
  } else if (!bf16) {
    mu_old = (maximize && !(adam && coupled)) || (rms && coupled);
    nu_old = false;
  } else if (!q8) {
    mu_old = nu_old = !(rms && coupled && c.decay_bf16);
  } else {
    mu_old = maximize || (coupled && c.decay_bf16);
    nu_old = true;
  }
  c.mu_old_first = Mask(mu_old);
  c.nu_old_first = Mask(nu_old);
  c.step_fused = Mask(!momentum_last && !(guarded_division && !bf16));
}

Consts Derive(int64_t kind, int64_t f, const float* scalars, int n_scalars) {
  Consts c;
  std::copy(scalars, scalars + n_scalars, c.sc);
  switch (kind) {
    case tbl::rms::kId: {
      namespace F = tbl::rms::flag;
      namespace S = tbl::rms::scalar;
      DeriveSteps(f & F::kMomentum, f & F::kScaleFirst, c.sc[S::kStepSize], c);
      DeriveTerms(f, {F::kMaximize, F::kCoupledDecay, 0, F::kDecoupledDecay, F::kDecayBf16,
                      F::kBf16},
                  c.sc[S::kWeightDecay], c);
      MovingAverageOrder(kind, false, f & F::kBf16, f & F::kQ8, f & F::kMaximize,
                         f & F::kCoupledDecay, (f & F::kMomentum) && (f & F::kScaleFirst), c);
      break;
    }
    case tbl::adam::kId: {
      namespace F = tbl::adam::flag;
      namespace S = tbl::adam::scalar;
      DeriveTerms(f, {F::kMaximize, F::kCoupledDecay, F::kWeightDecay, F::kDecoupledDecay,
                      F::kDecayBf16, F::kBf16},
                  c.sc[S::kWeightDecay], c);
      MovingAverageOrder(kind, !(f & F::kEpsHat), f & F::kBf16, f & F::kQ8, f & F::kMaximize,
                         f & F::kCoupledDecay, false, c);
      break;
    }
    case tbl::sgd::kId: {
      namespace F = tbl::sgd::flag;
      namespace S = tbl::sgd::scalar;
      DeriveSteps(f & F::kMomentum, f & F::kScaleFirst, c.sc[S::kStepSize], c);
      DeriveTerms(f, {F::kMaximize, F::kCoupledDecay, 0, F::kDecoupledDecay, F::kDecayBf16,
                      F::kBf16},
                  c.sc[S::kWeightDecay], c);
      MovingAverageOrder(kind, false, f & F::kBf16, f & F::kQ8, f & F::kMaximize,
                         f & F::kCoupledDecay, (f & F::kMomentum) && (f & F::kScaleFirst), c);
      break;
    }
    default:
      break;
  }
  return c;
}

// The bf16 and q8 flag bits of a kind (their positions differ between kinds).
int64_t StorageBit(int64_t kind, bool q8) {
  switch (kind) {
    case tbl::rms::kId:
      return q8 ? tbl::rms::flag::kQ8 : tbl::rms::flag::kBf16;
    case tbl::adam::kId:
      return q8 ? tbl::adam::flag::kQ8 : tbl::adam::flag::kBf16;
    case tbl::sgd::kId:
      return q8 ? tbl::sgd::flag::kQ8 : tbl::sgd::flag::kBf16;
    default:
      return 0;
  }
}

// RMSJAX_NATIVE_THREADS=<n> caps the tasks of one call (default: XLA's intra-op threads).
int64_t ThreadCap() {
  static const int64_t cap = [] {
    if (const char* env = std::getenv("RMSJAX_NATIVE_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return static_cast<int64_t>(v);
    }
    return std::numeric_limits<int64_t>::max();
  }();
  return cap;
}

// XLA's CPU code runs with denormals flushed to zero (inputs and results; it sets the
// floating-point control register around every computation), so the kernel does the same on
// each thread that computes, else 1e-40 would be 1e-40 here and 0 in the pure-JAX path.
class ScopedFlushDenormal {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  ScopedFlushDenormal() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~ScopedFlushDenormal() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtzDaz = 0x8040;  // flush-to-zero (bit 15), denormals-are-zero (6)
  unsigned saved_;
#elif defined(__aarch64__)
  ScopedFlushDenormal() {
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t fz = saved_ | (uint64_t{1} << 24);  // FZ: flush denormal inputs and results
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fz));
  }
  ~ScopedFlushDenormal() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
};

// Process the global unit range [lo, hi) of the concatenation of all leaves (units: elements,
// or blocks with q8).
void RunRange(const std::vector<Leaf>& leaves, const std::vector<int64_t>& starts, int64_t lo,
              int64_t hi, KernelFn fn, const Consts& c, const Codec* codecs) {
  const ScopedFlushDenormal flush;
  auto it = std::upper_bound(starts.begin(), starts.end(), lo);
  size_t k = static_cast<size_t>(it - starts.begin()) - 1;
  for (; k < leaves.size() && starts[k] < hi; ++k) {
    const int64_t a = std::max(lo, starts[k]) - starts[k];
    const int64_t b = std::min(hi, starts[k] + leaves[k].units) - starts[k];
    if (a < b) fn(leaves[k], a, b, c, codecs);
  }
}

// One call's work: its leaves as one range of units, claimed in pieces of 32K elements (128 KiB
// per float32 array; with q8, the blocks holding about as many elements) from a shared counter
// by the tasks that run it, so a thread that is busy with something else simply takes fewer
// pieces. The task that finishes the last unit completes the call's future. The tasks share the
// job through a shared_ptr: one that starts after the range is used up touches nothing but the
// counter, so nobody ever waits for a task that has not started (on a loaded machine that wait
// could last a whole time slice).
struct Job {
  static constexpr int64_t kPieceElements = int64_t{1} << 15;

  std::vector<Leaf> leaves;
  std::vector<int64_t> starts;  // starts[k]: the first unit of leaf k in the range
  Consts consts;
  Codec codecs[tbl::kMaxSlots];  // by slot (q8 only)
  KernelFn fn = nullptr;
  int64_t unit_elements = 1;  // elements per unit: 1, or the block size with q8
  int64_t total = 0;          // units
  std::atomic<int64_t> next{0};  // the first unit not claimed yet
  std::atomic<int64_t> done{0};  // units finished
  ffi::Promise promise;

  void Work() {
    const int64_t piece = std::max<int64_t>(1, kPieceElements / unit_elements);
    for (;;) {
      const int64_t lo = next.fetch_add(piece, std::memory_order_relaxed);
      if (lo >= total) return;
      const int64_t hi = std::min(total, lo + piece);
      RunRange(leaves, starts, lo, hi, fn, consts, codecs);
      // acq_rel: the finisher sees every other task's writes before completing the future.
      if (done.fetch_add(hi - lo, std::memory_order_acq_rel) + (hi - lo) == total) {
        promise.SetAvailable();
      }
    }
  }
};

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("rmsjax_fused_step: " + what);
}

// Reads the 8-bit codec operand ``bytes[0..size)`` into ``c`` (its layout: CODEC_SECTIONS in
// rmsjax/_native/table.py, the offsets from the generated header); nullptr, or what is wrong.
const char* ReadCodec(const uint8_t* bytes, size_t size, Codec& c) {
  namespace C = tbl::codec;
  static_assert(C::kFieldsCount == C::field::kCount, "the header holds every field");
  static_assert(sizeof c.qmap == sizeof(float) * C::kQmapCount &&
                    sizeof c.points == sizeof(float) * C::kPointsCount,
                "the map and the breakpoints fill the Codec's arrays");
  if (size < C::kCellsOffset) return "shorter than its fixed sections";
  int32_t head[C::field::kCount];
  std::memcpy(head, bytes + C::kFieldsOffset, sizeof head);
  const int64_t cells = head[C::field::kCells];
  if (head[C::field::kMagic] != C::kMagic) return "wrong magic number";
  if (head[C::field::kBlockSize] < 1 || head[C::field::kBlockSize] > kMaxBlock) {
    return "block size out of range";
  }
  if (head[C::field::kShift] < 0 || head[C::field::kShift] > 23 || head[C::field::kHalf] < 1 ||
      cells != 2 * int64_t{head[C::field::kHalf]}) {
    return "cell counts out of range";
  }
  if (size != C::kCellsOffset + static_cast<size_t>(cells) + C::kPaddingCount) {
    return "its size does not match its cell count";
  }
  c.block = head[C::field::kBlockSize];
  c.lo_bits = static_cast<uint32_t>(head[C::field::kLoBits]);
  c.shift = head[C::field::kShift];
  c.half = head[C::field::kHalf];
  std::memcpy(c.qmap, bytes + C::kQmapOffset, sizeof c.qmap);
  std::memcpy(c.points, bytes + C::kPointsOffset, sizeof c.points);
  c.cells.assign(bytes + C::kCellsOffset, bytes + size);  // the cells and the padding
  FillLevels(c);
  // The lookup reads points[cells[...]] and points[255] is +inf: every code stays < 256.
  if (c.lo_bits == 0 || c.lo_bits > 0x3f800000u ||
      ((0x3f800000u - c.lo_bits) >> c.shift) + 1 != static_cast<uint32_t>(c.half)) {
    return "the cell layout does not cover [-1, 1]";
  }
  return nullptr;
}

// Reads an 8-bit codec operand of a call (see ReadCodec).
ffi::Error ParseCodec(ffi::AnyBuffer buf, Codec& c) {
  if (buf.element_type() != ffi::U8) {
    return Invalid("a codec operand must be a uint8 array (see rmsjax._native.codecs)");
  }
  const char* why =
      ReadCodec(static_cast<const uint8_t*>(buf.untyped_data()), buf.element_count(), c);
  if (why != nullptr) {
    return Invalid(std::string("malformed codec operand: ") + why +
                   " (build it with rmsjax._native.codecs.operand)");
  }
  return ffi::Error::Success();
}

// The size of each axis of a buffer, as int64.
template <class B>
std::vector<int64_t> Dims(const B& buf) {
  auto d = buf.dimensions();
  return std::vector<int64_t>(d.begin(), d.end());
}

// Checks every operand against the table and fills ``job`` (nothing is read or written yet).
ffi::Error Prepare(ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args, ffi::RemainingRets rets,
                   int64_t kind, int64_t flags, int64_t n_leaves, int64_t table, Job& job) {
  if (table != tbl::kTableHash) {
    return Invalid("the caller's operand table (hash " + std::to_string(table) +
                   ") is not the one this library was built from (" +
                   std::to_string(tbl::kTableHash) + "); rebuild it: python -m rmsjax.native");
  }
  if (kind < 0 || kind >= tbl::kNumKinds) return Invalid("unknown kind " + std::to_string(kind));
  const tbl::KindInfo& info = tbl::kKinds[kind];
  const std::string name = info.name;  // for the error messages
  if ((flags & ~info.all_flags) != 0) {
    return Invalid(name + ": unknown flag bits " + std::to_string(flags & ~info.all_flags));
  }
  for (int e = 0; e < info.num_exclusive; ++e) {
    const int64_t set = flags & info.exclusive[e];
    if ((set & (set - 1)) != 0) {
      return Invalid(name + ": flag bits " + std::to_string(set) +
                     " exclude each other (at most one of them)");
    }
  }
  if (scalars.element_count() != static_cast<size_t>(info.num_scalars)) {
    return Invalid(name + " takes " + std::to_string(info.num_scalars) + " scalars, got " +
                   std::to_string(scalars.element_count()));
  }
  const bool bf16 = (flags & StorageBit(kind, false)) != 0;
  const bool q8 = (flags & StorageBit(kind, true)) != 0;
  int slots[tbl::kMaxSlots];
  int n_state = 0;
  for (int s = 0; s < info.num_slots; ++s) {
    if (info.slot_needs[s] == 0 || (flags & info.slot_needs[s]) != 0) slots[n_state++] = s;
  }
  if (q8 && n_state == 0) return Invalid(name + ": q8 needs a state slot");
  const size_t per_slot = q8 ? 2 : 1;
  const size_t n_codecs = q8 ? n_state : 0;
  const size_t in_per = 2 + per_slot * n_state, out_per = 1 + per_slot * n_state;
  if (n_leaves < 1 || args.size() != n_codecs + static_cast<size_t>(n_leaves) * in_per ||
      rets.size() != static_cast<size_t>(n_leaves) * out_per) {
    const std::string codecs = q8 ? std::to_string(n_codecs) + " codec operands, then " : "";
    return Invalid(name + " with flags " + std::to_string(flags) + " and " +
                   std::to_string(n_leaves) + " leaves takes " + codecs +
                   std::to_string(in_per) + " operands and " + std::to_string(out_per) +
                   " results per leaf; got " + std::to_string(args.size()) + " and " +
                   std::to_string(rets.size()));
  }
  for (size_t j = 0; j < n_codecs; ++j) {
    auto buf = args.get<ffi::AnyBuffer>(j);
    if (!buf.has_value()) return buf.error();
    ffi::Error err = ParseCodec(*buf, job.codecs[slots[j]]);
    if (!err.success()) return err;
    if (job.codecs[slots[j]].block != job.codecs[slots[0]].block) {
      return Invalid("the codecs of one call must have the same block size");
    }
    job.codecs[0].block = job.codecs[slots[0]].block;  // BlockLoop reads codecs[0].block
  }
  job.fn = Pick(kind, flags);
  if (job.fn == nullptr) return Invalid("no loop for kind " + name);
  const ffi::DataType p_type = bf16 ? ffi::BF16 : ffi::F32;
  const int64_t block = q8 ? job.codecs[0].block : 1;
  job.unit_elements = block;
  job.leaves.resize(n_leaves);
  job.starts.assign(n_leaves + 1, 0);
  for (size_t k = 0; k < static_cast<size_t>(n_leaves); ++k) {
    Leaf& L = job.leaves[k];
    L = Leaf{};
    const size_t base = n_codecs + k * in_per;
    auto p = args.get<ffi::AnyBuffer>(base);
    auto g = args.get<ffi::AnyBuffer>(base + 1);
    if (!p.has_value()) return p.error();
    if (!g.has_value()) return g.error();
    if (p->element_type() != p_type || g->element_type() != p_type) {
      return Invalid(std::string("parameters and gradients must be ") +
                     (bf16 ? "bfloat16 (flag bf16)" : "float32"));
    }
    const std::vector<int64_t> shape = Dims(*p);
    if (Dims(*g) != shape) return Invalid("a gradient differs from its parameter in shape");
    L.n = static_cast<int64_t>(p->element_count());
    L.p = p->untyped_data();
    L.g = g->untyped_data();
    std::vector<int64_t> scale_shape;
    if (q8) {
      L.cols = shape.empty() ? 1 : shape.back();
      L.nb = L.cols == 0 ? 0 : (L.cols + block - 1) / block;
      L.units = L.cols == 0 ? 0 : (L.n / L.cols) * L.nb;
      scale_shape = shape.empty() ? std::vector<int64_t>{1} : shape;
      scale_shape.back() = L.nb;
    } else {
      L.units = L.n;
    }
    auto p_ret = rets.get<ffi::AnyBuffer>(k * out_per);
    if (!p_ret.has_value()) return p_ret.error();
    if ((*p_ret)->element_type() != p_type || Dims(**p_ret) != shape) {
      return Invalid("a parameter result differs from its operand in dtype or shape");
    }
    L.p_out = (*p_ret)->untyped_data();
    for (int j = 0; j < n_state; ++j) {
      const int s = slots[j];
      const size_t a = base + 2 + per_slot * j, r = k * out_per + 1 + per_slot * j;
      if (!q8) {
        auto in = args.get<ffi::AnyBuffer>(a);
        auto out = rets.get<ffi::AnyBuffer>(r);
        if (!in.has_value()) return in.error();
        if (!out.has_value()) return out.error();
        if (in->element_type() != ffi::F32 || (*out)->element_type() != ffi::F32 ||
            static_cast<int64_t>(in->element_count()) != L.n ||
            static_cast<int64_t>((*out)->element_count()) != L.n) {
          return Invalid("a state operand or result is not float32 of its leaf's size");
        }
        L.s_in[s] = static_cast<const float*>(in->untyped_data());
        L.s_out[s] = static_cast<float*>((*out)->untyped_data());
        continue;
      }
      auto codes = args.get<ffi::AnyBuffer>(a);
      auto scales = args.get<ffi::AnyBuffer>(a + 1);
      auto codes_out = rets.get<ffi::AnyBuffer>(r);
      auto scales_out = rets.get<ffi::AnyBuffer>(r + 1);
      if (!codes.has_value()) return codes.error();
      if (!scales.has_value()) return scales.error();
      if (!codes_out.has_value()) return codes_out.error();
      if (!scales_out.has_value()) return scales_out.error();
      const bool codes_ok = codes->element_type() == ffi::U8 && Dims(*codes) == shape &&
                            (*codes_out)->element_type() == ffi::U8 &&
                            Dims(**codes_out) == shape;
      const bool scales_ok = scales->element_type() == ffi::F32 &&
                             static_cast<int64_t>(scales->element_count()) == L.units &&
                             (*scales_out)->element_type() == ffi::F32 &&
                             static_cast<int64_t>((*scales_out)->element_count()) == L.units;
      if (!codes_ok || !scales_ok) {
        return Invalid("8-bit state: codes must be uint8 of the parameter's shape and scales "
                       "float32 with one entry per block of " +
                       std::to_string(block) + " along the last axis");
      }
      L.c_in[s] = static_cast<const uint8_t*>(codes->untyped_data());
      L.c_out[s] = static_cast<uint8_t*>((*codes_out)->untyped_data());
      L.sc_in[s] = static_cast<const float*>(scales->untyped_data());
      L.sc_out[s] = static_cast<float*>((*scales_out)->untyped_data());
    }
    job.starts[k + 1] = job.starts[k] + L.units;
  }
  job.total = job.starts[n_leaves];
  job.consts = Derive(kind, flags, scalars.typed_data(), info.num_scalars);
  return ffi::Error::Success();
}

// The handler is asynchronous: it checks the operands, hands the work to XLA's own intra-op
// thread pool (the pool that runs XLA's CPU code) as a few tasks, and returns a future that
// the last task completes. So the calls of one step (a large tree is updated by several
// calls, see rmsjax._native.call.LEAVES_PER_CALL) do not wait for each other: XLA issues
// them all, and the pool's threads work through their pieces back to back, as if the tree
// were one call; and the kernel never adds threads of its own to the pool's.
ffi::Future FusedStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars,
                          ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t kind,
                          int64_t flags, int64_t n_leaves, int64_t table) {
  auto job = std::make_shared<Job>();
  ffi::Future future(job->promise);
  ffi::Error err = Prepare(scalars, args, rets, kind, flags, n_leaves, table, *job);
  if (!err.success()) {
    job->promise.SetError(std::move(err));
    return future;
  }
  if (job->total == 0) {
    job->promise.SetAvailable();
    return future;
  }
  // One task per 64K elements at most: below that, waking a thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / job->unit_elements);
  const int64_t pool_threads = pool.num_threads();
  const int64_t tasks = std::min({std::max<int64_t>(pool_threads, 1), ThreadCap(),
                                  (job->total + grain - 1) / grain});
  if (pool_threads < 1 || (tasks <= 1 && job->total <= grain)) {
    job->Work();  // no pool, or too little work to hand over: here and now
    return future;
  }
  for (int64_t t = 0; t < tasks; ++t) pool.Schedule([job] { job->Work(); });
  return future;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RmsjaxFusedStep, FusedStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("flags")
                                  .Attr<int64_t>("leaves")
                                  .Attr<int64_t>("table"));

// Build information, read by rmsjax.native (ctypes) for its status line and to recognise a
// library built from another version of this source.
#ifndef RMSJAX_SOURCE_ID
#define RMSJAX_SOURCE_ID unknown
#endif
#define RMSJAX_STR2(x) #x
#define RMSJAX_STR(x) RMSJAX_STR2(x)

extern "C" __attribute__((visibility("default"))) const char* RmsjaxSourceId() {
  return RMSJAX_STR(RMSJAX_SOURCE_ID);
}

extern "C" __attribute__((visibility("default"))) const char* RmsjaxKernelIsa() {
  switch (KernelIsa()) {
    case kIsaAvx512:
      return "avx512+avx2+fma";  // AVX-512 for the 8-bit state loops, AVX2+FMA for the others
    case kIsaAvx2:
      return "avx2+fma";
    default:
      return "baseline";
  }
}
