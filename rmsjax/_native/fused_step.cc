// rmsjax native CPU step: one XLA FFI call updates the parameters AND the optimizer state of
// every leaf of a tree in a single pass over memory, in place when XLA aliases the buffers
// (the Python side declares input_output_aliases and the caller donates the inputs).
//
// The arithmetic mirrors, operation for operation, the pure-JAX rules in rmsjax/transforms/
// (_rms_rule, _centered_rms_rule, _scale_rule, _trace_rule, _adam_rule, _decay_rule) composed
// as the optimizers chain them, then p + u; on every input, NaN and Inf included (see "Guards"
// below). Hyperparameters arrive as a float32 operand computed by JAX (so schedules and
// injected hyperparameters are traced values, not constants).
//
// Operands (defined ONLY by rmsjax/_native/table.py, from which the build generates
// rmsjax_kernel_table.h: the scalar, slot and flag names used below):
//   scalars f32[<kind>::scalar::kCount], then per leaf: p, g, slot_1 .. slot_n
//   results, per leaf: p, slot_1 .. slot_n   (aliased to the operands)
// with the slots of the kind whose flag is set, in table order. Attributes: kind (the table's
// kind id), flags (bit mask of the kind's flags), leaves (number of leaves), table (the table
// hash). Every call is checked against the table exactly; a mismatch is an FFI error.
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
// latter chosen at run time when the CPU has both (see Dispatch); the library needs no -march
// flag, so it runs on any x86-64 CPU. Only IEEE operations are used (+ - * / sqrt, correctly
// rounded; no reciprocal or rsqrt approximations). The build passes -ffp-contract=fast, so
// a * b + c becomes one FMA where the instruction set has it, as in XLA's CPU code: the
// AVX2+FMA version rounds like the pure-JAX path on an FMA CPU, the baseline version like it
// on a CPU without FMA (the two versions can differ in the last bits, as XLA itself does).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "rmsjax_kernel_table.h"  // generated from rmsjax/_native/table.py by build.py
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace tbl = rmsjax_table;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// One leaf's arrays; the state arrays are indexed by the kind's slot enum (absent slots null).
struct Leaf {
  int64_t n;
  const float* p;
  const float* g;
  const float* s_in[tbl::kMaxSlots];
  float* p_out;
  float* s_out[tbl::kMaxSlots];
};

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

// ---- rmsprop family: scale_by_[centered_]rms, scale_by_learning_rate, trace ------------------
template <bool kCentered, bool kEpsInSqrt, bool kMomentum, bool kNesterov>
struct Rms {
  [[gnu::always_inline]] static inline void Loop(const Leaf& L, int64_t lo, int64_t hi,
                                                 const float* sc) {
    namespace S = tbl::rms::scalar;
    namespace T = tbl::rms::slot;
    const float omd = sc[S::kOneMinusDecay], decay = sc[S::kDecay], eps = sc[S::kEps];
    const float corr = sc[S::kCorrection], lr = sc[S::kStepSize], beta = sc[S::kMomentum];
    const float* p = L.p;
    const float* g = L.g;
    const float* mu_in = L.s_in[T::kMu];
    const float* nu_in = L.s_in[T::kNu];
    const float* m_in = L.s_in[T::kTrace];
    float* p_out = L.p_out;
    float* mu_out = L.s_out[T::kMu];
    float* nu_out = L.s_out[T::kNu];
    float* m_out = L.s_out[T::kTrace];
#pragma GCC ivdep
    for (int64_t i = lo; i < hi; ++i) {
      const float gi = g[i];
      const float nu = omd * (gi * gi) + decay * nu_in[i];
      float var;
      if constexpr (kCentered) {
        const float mu = omd * gi + decay * mu_in[i];
        const float nh = nu / corr;
        const float mh = mu / corr;
        const float d = nh - mh * mh;
        // where(nu_hat == +inf, +inf, max(d, 0)); a NaN d stays NaN, like jnp.maximum
        var = nh == kInf ? kInf : (d < 0.0f ? 0.0f : d);
        mu_out[i] = mu;
      } else {
        var = nu / corr;
      }
      float s;
      if constexpr (kEpsInSqrt) {
        s = SafeRsqrtScale(gi, var + eps);
      } else {
        s = SafeDiv(gi, std::sqrt(var) + eps);
      }
      float u = lr * s;
      if constexpr (kMomentum) {
        const float m = u + beta * m_in[i];
        u = kNesterov ? u + beta * m : m;
        m_out[i] = m;
      }
      nu_out[i] = nu;
      p_out[i] = p[i] + u;
    }
  }
};

// ---- adam / adamw: scale_by_adam, [add_decayed_weights], scale_by_learning_rate --------------
template <bool kNesterov, bool kDecay>
struct Adam {
  [[gnu::always_inline]] static inline void Loop(const Leaf& L, int64_t lo, int64_t hi,
                                                 const float* sc) {
    namespace S = tbl::adam::scalar;
    namespace T = tbl::adam::slot;
    const float omb1 = sc[S::kOneMinusB1], b1 = sc[S::kB1];
    const float omb2 = sc[S::kOneMinusB2], b2 = sc[S::kB2];
    const float eps = sc[S::kEps], eps_root = sc[S::kEpsRoot];
    const float c1 = sc[S::kC1], c2 = sc[S::kC2], c1n = sc[S::kC1Next];
    const float lr = sc[S::kStepSize], wd = sc[S::kWeightDecay];
    const float* p = L.p;
    const float* g = L.g;
    const float* mu_in = L.s_in[T::kMu];
    const float* nu_in = L.s_in[T::kNu];
    float* p_out = L.p_out;
    float* mu_out = L.s_out[T::kMu];
    float* nu_out = L.s_out[T::kNu];
#pragma GCC ivdep
    for (int64_t i = lo; i < hi; ++i) {
      const float gi = g[i];
      const float pi = p[i];
      const float mu = omb1 * gi + b1 * mu_in[i];
      const float nu = omb2 * (gi * gi) + b2 * nu_in[i];
      const float mh = kNesterov ? b1 * (mu / c1n) + omb1 * (gi / c1) : mu / c1;
      float s = MomentDiv(mh, std::sqrt(nu / c2 + eps_root) + eps, gi);
      if constexpr (kDecay) s = s + wd * pi;
      mu_out[i] = mu;
      nu_out[i] = nu;
      p_out[i] = pi + lr * s;
    }
  }
};

// ---- sgd: [trace], scale_by_learning_rate ----------------------------------------------------
template <bool kMomentum, bool kNesterov>
struct Sgd {
  [[gnu::always_inline]] static inline void Loop(const Leaf& L, int64_t lo, int64_t hi,
                                                 const float* sc) {
    namespace S = tbl::sgd::scalar;
    const float lr = sc[S::kStepSize], beta = sc[S::kMomentum];
    const float* p = L.p;
    const float* g = L.g;
    const float* m_in = L.s_in[tbl::sgd::slot::kTrace];
    float* p_out = L.p_out;
    float* m_out = L.s_out[tbl::sgd::slot::kTrace];
#pragma GCC ivdep
    for (int64_t i = lo; i < hi; ++i) {
      const float gi = g[i];
      float u = gi;
      if constexpr (kMomentum) {
        const float m = gi + beta * m_in[i];
        u = kNesterov ? gi + beta * m : m;
        m_out[i] = m;
      }
      p_out[i] = p[i] + lr * u;
    }
  }
};

using KernelFn = void (*)(const Leaf&, int64_t, int64_t, const float*);

// The two compilations of each loop: K::Loop is inlined into each, so the loop is vectorised
// for that function's instruction set.
template <class K>
void Baseline(const Leaf& L, int64_t lo, int64_t hi, const float* sc) {
  K::Loop(L, lo, hi, sc);
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RMSJAX_HAVE_AVX2_VERSION 1
template <class K>
[[gnu::target("avx2,fma")]] void Avx2Fma(const Leaf& L, int64_t lo, int64_t hi,
                                         const float* sc) {
  K::Loop(L, lo, hi, sc);
}
#endif

// True when the AVX2+FMA versions run: the CPU (and OS) support both, and
// RMSJAX_NATIVE_ISA=baseline does not ask for the baseline versions (for testing).
bool UseAvx2Fma() {
  static const bool use = [] {
#ifdef RMSJAX_HAVE_AVX2_VERSION
    const char* env = std::getenv("RMSJAX_NATIVE_ISA");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return use;
}

template <class K>
KernelFn Dispatch() {
#ifdef RMSJAX_HAVE_AVX2_VERSION
  if (UseAvx2Fma()) return Avx2Fma<K>;
#endif
  return Baseline<K>;
}

// The loop for a kind and its flag bits (the flag names are the table's; the static_asserts
// fail to compile when the table gains a flag these dispatchers do not know).
KernelFn PickRms(int64_t f) {
  namespace F = tbl::rms::flag;
  static_assert(F::kAll == (F::kCentered | F::kEpsInSqrt | F::kMomentum | F::kNesterov),
                "rms: a flag of the table is not dispatched");
  const bool momentum = f & F::kMomentum;
  const int key = (((f & F::kCentered) != 0) << 3) | (((f & F::kEpsInSqrt) != 0) << 2) |
                  (momentum << 1) | (momentum && (f & F::kNesterov));
  using Pick = KernelFn (*)();
  static const Pick table[16] = {
      Dispatch<Rms<false, false, false, false>>, Dispatch<Rms<false, false, false, true>>,
      Dispatch<Rms<false, false, true, false>>,  Dispatch<Rms<false, false, true, true>>,
      Dispatch<Rms<false, true, false, false>>,  Dispatch<Rms<false, true, false, true>>,
      Dispatch<Rms<false, true, true, false>>,   Dispatch<Rms<false, true, true, true>>,
      Dispatch<Rms<true, false, false, false>>,  Dispatch<Rms<true, false, false, true>>,
      Dispatch<Rms<true, false, true, false>>,   Dispatch<Rms<true, false, true, true>>,
      Dispatch<Rms<true, true, false, false>>,   Dispatch<Rms<true, true, false, true>>,
      Dispatch<Rms<true, true, true, false>>,    Dispatch<Rms<true, true, true, true>>,
  };
  return table[key]();
}

KernelFn PickAdam(int64_t f) {
  namespace F = tbl::adam::flag;
  static_assert(F::kAll == (F::kNesterov | F::kWeightDecay), "adam: a flag is not dispatched");
  const bool nesterov = f & F::kNesterov, decay = f & F::kWeightDecay;
  return nesterov ? (decay ? Dispatch<Adam<true, true>>() : Dispatch<Adam<true, false>>())
                  : (decay ? Dispatch<Adam<false, true>>() : Dispatch<Adam<false, false>>());
}

KernelFn PickSgd(int64_t f) {
  namespace F = tbl::sgd::flag;
  static_assert(F::kAll == (F::kMomentum | F::kNesterov), "sgd: a flag is not dispatched");
  if (!(f & F::kMomentum)) return Dispatch<Sgd<false, false>>();
  return (f & F::kNesterov) ? Dispatch<Sgd<true, true>>() : Dispatch<Sgd<true, false>>();
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

// Process the global element range [lo, hi) of the concatenation of all leaves.
void RunRange(const std::vector<Leaf>& leaves, const std::vector<int64_t>& starts, int64_t lo,
              int64_t hi, KernelFn fn, const float* sc) {
  const ScopedFlushDenormal flush;
  auto it = std::upper_bound(starts.begin(), starts.end(), lo);
  size_t k = static_cast<size_t>(it - starts.begin()) - 1;
  for (; k < leaves.size() && starts[k] < hi; ++k) {
    const int64_t a = std::max(lo, starts[k]) - starts[k];
    const int64_t b = std::min(hi, starts[k] + leaves[k].n) - starts[k];
    if (a < b) fn(leaves[k], a, b, sc);
  }
}

// One call's work: its leaves as one range of elements, claimed in blocks of 32K elements
// (128 KiB per array) from a shared counter by the tasks that run it, so a thread that is busy
// with something else simply takes fewer blocks. The task that finishes the last element
// completes the call's future. The tasks share the job through a shared_ptr: one that starts
// after the range is used up touches nothing but the counter, so nobody ever waits for a task
// that has not started (on a loaded machine that wait could last a whole time slice).
struct Job {
  static constexpr int64_t kBlock = int64_t{1} << 15;

  std::vector<Leaf> leaves;
  std::vector<int64_t> starts;  // starts[k]: the first element of leaf k in the range
  std::vector<float> scalars;
  KernelFn fn = nullptr;
  int64_t total = 0;
  std::atomic<int64_t> next{0};  // the first element not claimed yet
  std::atomic<int64_t> done{0};  // elements finished
  ffi::Promise promise;

  void Work() {
    for (;;) {
      const int64_t lo = next.fetch_add(kBlock, std::memory_order_relaxed);
      if (lo >= total) return;
      const int64_t hi = std::min(total, lo + kBlock);
      RunRange(leaves, starts, lo, hi, fn, scalars.data());
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
  if (scalars.element_count() != static_cast<size_t>(info.num_scalars)) {
    return Invalid(name + " takes " + std::to_string(info.num_scalars) + " scalars, got " +
                   std::to_string(scalars.element_count()));
  }
  int slots[tbl::kMaxSlots];
  int n_state = 0;
  for (int s = 0; s < info.num_slots; ++s) {
    if (info.slot_needs[s] == 0 || (flags & info.slot_needs[s]) != 0) slots[n_state++] = s;
  }
  const size_t in_per = 2 + n_state, out_per = 1 + n_state;
  if (n_leaves < 1 || args.size() != static_cast<size_t>(n_leaves) * in_per ||
      rets.size() != static_cast<size_t>(n_leaves) * out_per) {
    return Invalid(name + " with flags " + std::to_string(flags) + " and " +
                   std::to_string(n_leaves) + " leaves takes " + std::to_string(in_per) +
                   " operands and " + std::to_string(out_per) + " results per leaf; got " +
                   std::to_string(args.size()) + " and " + std::to_string(rets.size()));
  }
  job.fn = Pick(kind, flags);
  if (job.fn == nullptr) return Invalid("no loop for kind " + name);
  job.leaves.resize(n_leaves);
  job.starts.assign(n_leaves + 1, 0);
  for (size_t k = 0; k < static_cast<size_t>(n_leaves); ++k) {
    Leaf& L = job.leaves[k];
    const float* in[2 + tbl::kMaxSlots] = {};
    int64_t n = -1;
    for (size_t j = 0; j < in_per; ++j) {
      auto buf = args.get<ffi::AnyBuffer>(k * in_per + j);
      if (!buf.has_value()) return buf.error();
      if (buf->element_type() != ffi::F32) return Invalid("operands must be float32");
      const int64_t m = static_cast<int64_t>(buf->element_count());
      if (n >= 0 && m != n) return Invalid("the arrays of one leaf differ in size");
      n = m;
      in[j] = static_cast<const float*>(buf->untyped_data());
    }
    float* out[1 + tbl::kMaxSlots] = {};
    for (size_t j = 0; j < out_per; ++j) {
      auto buf = rets.get<ffi::AnyBuffer>(k * out_per + j);
      if (!buf.has_value()) return buf.error();
      if ((*buf)->element_type() != ffi::F32 ||
          static_cast<int64_t>((*buf)->element_count()) != n) {
        return Invalid("a result buffer is not float32 of its leaf's size");
      }
      out[j] = static_cast<float*>((*buf)->untyped_data());
    }
    L = Leaf{};
    L.n = n;
    L.p = in[0];
    L.g = in[1];
    L.p_out = out[0];
    for (int j = 0; j < n_state; ++j) {
      L.s_in[slots[j]] = in[2 + j];
      L.s_out[slots[j]] = out[1 + j];
    }
    job.starts[k + 1] = job.starts[k] + n;
  }
  job.total = job.starts[n_leaves];
  job.scalars.assign(scalars.typed_data(), scalars.typed_data() + info.num_scalars);
  return ffi::Error::Success();
}

// The handler is asynchronous: it checks the operands, hands the work to XLA's own intra-op
// thread pool (the pool that runs XLA's CPU code) as a few tasks, and returns a future that
// the last task completes. So the calls of one step (a large tree is updated by several
// calls, see rmsjax.fused.engine.LEAVES_PER_CALL) do not wait for each other: XLA issues
// them all, and the pool's threads work through their blocks back to back, as if the tree
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
  const int64_t grain = int64_t{1} << 16;
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
  return UseAvx2Fma() ? "avx2+fma" : "baseline";
}
