// rmsjax native CPU step: one XLA FFI call updates the parameters AND the optimizer state of
// every leaf of a tree in a single pass over memory, in place when XLA aliases the buffers
// (the Python side declares input_output_aliases and the caller donates the inputs).
//
// The arithmetic mirrors, operation for operation, the pure-JAX rules in rmsjax/transforms.py
// (_rms_rule, _centered_rms_rule, _scale_rule, _trace_rule, _adam_rule, _decay_rule) composed
// as the optimizers chain them, then p + u. Hyperparameters arrive as a float32 operand
// computed by JAX (so schedules and injected hyperparameters are traced values, not constants).
//
// Operands: scalars f32[k], then per leaf: p, g, state_1 .. state_n   (all float32, same size)
// Results:  per leaf: p, state_1 .. state_n                          (aliased to the operands)
//
// Each loop below is written once, as the always-inline Loop of a struct, and compiled twice:
// into a baseline function and, on x86-64, into an AVX2+FMA function (target attribute), the
// latter chosen at run time when the CPU has both (see Dispatch); the library needs no -march
// flag, so it runs on any x86-64 CPU. Only IEEE operations are used (+ - * / sqrt, correctly
// rounded; no reciprocal or rsqrt approximations). The build passes -ffp-contract=fast, so
// a * b + c becomes one FMA where the instruction set has it, as in XLA's CPU code: the
// AVX2+FMA version rounds like the pure-JAX path on an FMA CPU, the baseline version like it
// on a CPU without FMA (the two versions can differ in the last bits, as XLA itself does).

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int64_t { kRms = 0, kAdam = 1, kSgd = 2 };

struct Leaf {
  int64_t n;
  const float* p;
  const float* g;
  const float* s_in[3];
  float* p_out;
  float* s_out[3];
};

// ---- rmsprop family: scalars = [1-decay, decay, eps, correction, step_size, beta] ----------
template <bool kCentered, bool kEpsInSqrt, bool kMomentum, bool kNesterov>
struct Rms {
  [[gnu::always_inline]] static inline void Loop(const Leaf& L, int64_t lo, int64_t hi,
                                                 const float* sc) {
    const float omd = sc[0], decay = sc[1], eps = sc[2], corr = sc[3], lr = sc[4], beta = sc[5];
    const float* p = L.p;
    const float* g = L.g;
    const float* mu_in = kCentered ? L.s_in[0] : nullptr;
    const float* nu_in = L.s_in[kCentered ? 1 : 0];
    const float* m_in = kMomentum ? L.s_in[kCentered ? 2 : 1] : nullptr;
    float* p_out = L.p_out;
    float* mu_out = kCentered ? L.s_out[0] : nullptr;
    float* nu_out = L.s_out[kCentered ? 1 : 0];
    float* m_out = kMomentum ? L.s_out[kCentered ? 2 : 1] : nullptr;
#pragma GCC ivdep
    for (int64_t i = lo; i < hi; ++i) {
      const float gi = g[i];
      const float nu = omd * (gi * gi) + decay * nu_in[i];
      float var;
      if constexpr (kCentered) {
        const float mu = omd * gi + decay * mu_in[i];
        const float mc = mu / corr;
        var = nu / corr - mc * mc;
        var = var < 0.0f ? 0.0f : var;  // clamp; NaN stays NaN like jnp.maximum
        mu_out[i] = mu;
      } else {
        var = nu / corr;
      }
      float s;
      if constexpr (kEpsInSqrt) {
        const float den2 = var + eps;
        // as safe_rsqrt_scale: where(ok, g * rsqrt(where(ok, d, 1)), 0)
        const bool ok = den2 > 0.0f;
        const float r = gi * (1.0f / std::sqrt(ok ? den2 : 1.0f));
        s = ok ? r : 0.0f;
      } else {
        const float den = std::sqrt(var) + eps;
        const bool ok = den > 0.0f;  // as safe_div: where(ok, num / where(ok, den, 1), 0)
        const float r = gi / (ok ? den : 1.0f);
        s = ok ? r : 0.0f;
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

// ---- adam / adamw: scalars = [1-b1, b1, 1-b2, b2, eps, eps_root, c1, c2, c1_next, step, wd] -
template <bool kNesterov, bool kDecay>
struct Adam {
  [[gnu::always_inline]] static inline void Loop(const Leaf& L, int64_t lo, int64_t hi,
                                                 const float* sc) {
    const float omb1 = sc[0], b1 = sc[1], omb2 = sc[2], b2 = sc[3], eps = sc[4], eps_root = sc[5];
    const float c1 = sc[6], c2 = sc[7], c1n = sc[8], lr = sc[9], wd = sc[10];
    const float* p = L.p;
    const float* g = L.g;
    const float* mu_in = L.s_in[0];
    const float* nu_in = L.s_in[1];
    float* p_out = L.p_out;
    float* mu_out = L.s_out[0];
    float* nu_out = L.s_out[1];
#pragma GCC ivdep
    for (int64_t i = lo; i < hi; ++i) {
      const float gi = g[i];
      const float pi = p[i];
      const float mu = omb1 * gi + b1 * mu_in[i];
      const float nu = omb2 * (gi * gi) + b2 * nu_in[i];
      const float mh = kNesterov ? b1 * (mu / c1n) + omb1 * (gi / c1) : mu / c1;
      const float den = std::sqrt(nu / c2 + eps_root) + eps;
      const bool ok = den > 0.0f;
      const float r = mh / (ok ? den : 1.0f);
      float s = ok ? r : 0.0f;
      if constexpr (kDecay) s = s + wd * pi;
      mu_out[i] = mu;
      nu_out[i] = nu;
      p_out[i] = pi + lr * s;
    }
  }
};

// ---- sgd with optional (Nesterov) momentum: scalars = [step_size, beta] ---------------------
template <bool kMomentum, bool kNesterov>
struct Sgd {
  [[gnu::always_inline]] static inline void Loop(const Leaf& L, int64_t lo, int64_t hi,
                                                 const float* sc) {
    const float lr = sc[0], beta = sc[1];
    const float* p = L.p;
    const float* g = L.g;
    const float* m_in = kMomentum ? L.s_in[0] : nullptr;
    float* p_out = L.p_out;
    float* m_out = kMomentum ? L.s_out[0] : nullptr;
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

KernelFn PickRms(bool centered, bool eps_in_sqrt, bool momentum, bool nesterov) {
  const int key = (centered << 3) | (eps_in_sqrt << 2) | (momentum << 1) | (nesterov && momentum);
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

int MaxThreads() {
  static const int n = [] {
    if (const char* env = std::getenv("RMSJAX_NATIVE_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }();
  return n;
}

// A persistent pool of worker threads (a step may be split over several calls, so starting
// threads per call would cost more than the work on small trees). One job at a time: a call
// that finds the pool busy (XLA running two calls concurrently) does its work on its own.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { Loop(i); });
    for (auto& t : threads_) t.detach();
  }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  void Run(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || n <= 1 || n > size()) {
      for (int t = 0; t < n; ++t) f(t);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = &f;
      n_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    cv_.notify_all();
    f(0);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void Loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (id + 1 >= n_) continue;
        job = job_;
      }
      (*job)(id + 1);
      std::lock_guard<std::mutex> lk(m_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_, m_;
  std::condition_variable cv_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int n_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

Pool& GetPool() {
  // Leaked on purpose (no join at exit); re-created in a forked child, which has no workers.
  static std::mutex mu;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lk(mu);
  if (pool == nullptr || owner != getpid()) {
    pool = new Pool(MaxThreads() - 1);
    owner = getpid();
  }
  return *pool;
}

// Process the global element range [lo, hi) of the concatenation of all leaves.
void RunRange(const std::vector<Leaf>& leaves, const std::vector<int64_t>& starts, int64_t lo,
              int64_t hi, KernelFn fn, const float* sc) {
  auto it = std::upper_bound(starts.begin(), starts.end(), lo);
  size_t k = static_cast<size_t>(it - starts.begin()) - 1;
  for (; k < leaves.size() && starts[k] < hi; ++k) {
    const int64_t a = std::max(lo, starts[k]) - starts[k];
    const int64_t b = std::min(hi, starts[k] + leaves[k].n) - starts[k];
    if (a < b) fn(leaves[k], a, b, sc);
  }
}

ffi::Error FusedStepImpl(ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                         ffi::RemainingRets rets, int64_t kind, bool centered, bool eps_in_sqrt,
                         bool momentum, bool nesterov, bool weight_decay) {
  int n_state = 0;
  KernelFn fn = nullptr;
  size_t need = 0;
  switch (kind) {
    case kRms:
      n_state = 1 + centered + momentum;
      fn = PickRms(centered, eps_in_sqrt, momentum, nesterov);
      need = 6;
      break;
    case kAdam:
      n_state = 2;
      fn = nesterov ? (weight_decay ? Dispatch<Adam<true, true>>()  //
                                    : Dispatch<Adam<true, false>>())
                    : (weight_decay ? Dispatch<Adam<false, true>>()  //
                                    : Dispatch<Adam<false, false>>());
      need = 11;
      break;
    case kSgd:
      n_state = momentum ? 1 : 0;
      fn = momentum ? (nesterov ? Dispatch<Sgd<true, true>>() : Dispatch<Sgd<true, false>>())
                    : Dispatch<Sgd<false, false>>();
      need = 2;
      break;
    default:
      return ffi::Error::InvalidArgument("rmsjax_fused_step: unknown kind");
  }
  if (scalars.element_count() < need) {
    return ffi::Error::InvalidArgument("rmsjax_fused_step: too few scalars for this kind");
  }
  const size_t in_per = 2 + n_state, out_per = 1 + n_state;
  if (args.size() % in_per != 0 || rets.size() != args.size() / in_per * out_per) {
    return ffi::Error::InvalidArgument("rmsjax_fused_step: operand count does not match kind");
  }
  const size_t n_leaves = args.size() / in_per;
  std::vector<Leaf> leaves(n_leaves);
  std::vector<int64_t> starts(n_leaves + 1, 0);
  for (size_t k = 0; k < n_leaves; ++k) {
    Leaf& L = leaves[k];
    const float* in[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    int64_t n = -1;
    for (size_t j = 0; j < in_per; ++j) {
      auto buf = args.get<ffi::AnyBuffer>(k * in_per + j);
      if (!buf.has_value()) return buf.error();
      if (buf->element_type() != ffi::F32) {
        return ffi::Error::InvalidArgument("rmsjax_fused_step: operands must be float32");
      }
      const int64_t m = static_cast<int64_t>(buf->element_count());
      if (n >= 0 && m != n) return ffi::Error::InvalidArgument("rmsjax_fused_step: size mismatch");
      n = m;
      in[j] = static_cast<const float*>(buf->untyped_data());
    }
    L.n = n;
    L.p = in[0];
    L.g = in[1];
    float* out[4] = {nullptr, nullptr, nullptr, nullptr};
    for (size_t j = 0; j < out_per; ++j) {
      auto buf = rets.get<ffi::AnyBuffer>(k * out_per + j);
      if (!buf.has_value()) return buf.error();
      if ((*buf)->element_type() != ffi::F32 ||
          static_cast<int64_t>((*buf)->element_count()) != n) {
        return ffi::Error::InvalidArgument("rmsjax_fused_step: bad result buffer");
      }
      out[j] = static_cast<float*>((*buf)->untyped_data());
    }
    L.p_out = out[0];
    for (int j = 0; j < n_state; ++j) {
      L.s_in[j] = in[2 + j];
      L.s_out[j] = out[1 + j];
    }
    starts[k + 1] = starts[k] + n;
  }
  const int64_t total = starts[n_leaves];
  const float* sc = scalars.typed_data();
  // One thread per 64K elements at most: below that, waking a thread costs more than it saves.
  const int64_t grain = int64_t{1} << 16;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(GetPool().size(), (total + grain - 1) / grain)));
  if (threads == 1) {
    RunRange(leaves, starts, 0, total, fn, sc);
    return ffi::Error::Success();
  }
  // Threads claim blocks of 32K elements (128 KiB per array) from a shared counter, so a core
  // that is busy with something else simply takes fewer blocks (no static split to wait for).
  const int64_t block = int64_t{1} << 15;
  std::atomic<int64_t> next{0};
  GetPool().Run(threads, [&](int) {
    for (;;) {
      const int64_t lo = next.fetch_add(block, std::memory_order_relaxed);
      if (lo >= total) break;
      RunRange(leaves, starts, lo, std::min(total, lo + block), fn, sc);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RmsjaxFusedStep, FusedStepImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("kind")
                                  .Attr<bool>("centered")
                                  .Attr<bool>("eps_in_sqrt")
                                  .Attr<bool>("momentum")
                                  .Attr<bool>("nesterov")
                                  .Attr<bool>("weight_decay"));

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
