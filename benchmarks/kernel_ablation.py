"""Where the native kernel's 8-bit AdamW step spends its time: an ablation on one CPU core.

``benchmarks/run.py --lowbit`` times the fused 8-bit AdamW step against optax's float32 step;
this script explains the result. It compiles a small C++ driver around the kernel's own source
(``rmsjax/_native/fused_step.cc``, with the flags and the generated operand header of
``rmsjax/_native/build.py``) and calls the AVX-512 8-bit AdamW loop directly on one thread, over
one leaf of float32 parameters and gradients with 8-bit moments in rmsjax's codec. Then it
recompiles the same source with one part changed at a time and reports the time per element of
each version. The changed versions compute WRONG numbers: they only say what each part costs.

  removed:        the code search of the requantisation (codes by truncation instead),
                  the division of each entry by its block's scale in the requantisation
                  (a multiplication instead), the two bias-correction divisions of the rule
                  (multiplications instead), the decode (codes times the scale, no table);
  alternatives:   (these compute the same numbers as the kernel) the code search by the
                  codec's cell table with AVX-512 gathers (the AVX2 loop's method) instead of
                  the in-register binary search, and the requantisation's division by an exact
                  reciprocal sequence (Markstein's correction, four multiply-adds) instead of a
                  division, and the same for the rule's two bias-correction divisions (exact
                  on this run's numbers; not in general without a fallback for moments
                  outside float32's normal range).

Usage (x86-64 with AVX-512 F/BW/DQ/VL/VBMI and GFNI, a C++ compiler, jaxlib installed)::

  python benchmarks/kernel_ablation.py            # writes results/lowbit/ablation.{json,md}

Each version is timed as the fastest of ``--reps`` calls over ``--elements`` entries (default
1M, 4 MiB of parameters: in cache, so the compute shows; ``--elements 16777216`` adds memory);
the table reports ns per element and the difference from the kernel as it is.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.machine import describe  # noqa: E402
from rmsjax._native import build, codecs  # noqa: E402  (the kernel's recipe and operands)
from rmsjax.quantization import moment_codec  # noqa: E402

# The driver: reads the two codec operands with the kernel's own reader (ReadCodec, which the
# FFI handler's ParseCodec calls), builds one leaf of rows x 4096 entries, and times the
# AVX-512 loop of the AdamW rule with 8-bit moments.
DRIVER = r"""
#include SOURCE
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>

static Codec Load(const char* path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)), {});
  Codec c;
  if (const char* why = ReadCodec(b.data(), b.size(), c)) {
    std::fprintf(stderr, "%s: malformed codec operand: %s\n", path, why);
    std::exit(2);
  }
  return c;
}

int main(int argc, char** argv) {
  const int64_t cols = 4096, rows = std::atoll(argv[3]) / cols, n = rows * cols;
  const int reps = std::atoi(argv[4]);
  const Codec codec[3] = {Load(argv[1]), Load(argv[2]), Load(argv[1])};
  const int64_t nb = cols / codec[0].block, blocks = rows * nb;
  std::vector<float> p(n), g(n), mu_scale(blocks, 0.0f), nu_scale(blocks, 0.0f);
  std::vector<uint8_t> mu(n, 0), nu(n, 0);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < n; ++i) p[i] = normal(rng), g[i] = 1e-2f * normal(rng);
  Leaf L;
  L.n = n, L.units = blocks, L.cols = cols, L.nb = nb;
  L.p = p.data(), L.g = g.data(), L.p_out = p.data();
  L.c_in[0] = L.c_out[0] = mu.data(), L.c_in[1] = L.c_out[1] = nu.data();
  L.sc_in[0] = L.sc_out[0] = mu_scale.data(), L.sc_in[1] = L.sc_out[1] = nu_scale.data();
  namespace S = tbl::adam::scalar;
  float sc[S::kCount + 4] = {};  // + the reciprocals of the two corrections (a variant's)
  sc[S::kOneMinusB1] = 0.1f, sc[S::kB1] = 0.9f, sc[S::kOneMinusB2] = 0.001f, sc[S::kB2] = 0.999f;
  sc[S::kEps] = 1e-8f, sc[S::kStepSize] = -1e-3f, sc[S::kWeightDecay] = 1e-4f;
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const float t = static_cast<float>(r + 1);
    sc[S::kC1] = 1.0f - std::pow(0.9f, t), sc[S::kC1Next] = 1.0f - std::pow(0.9f, t + 1);
    sc[S::kC2] = 1.0f - std::pow(0.999f, t);
    for (int i = 0; i < 2; ++i) {  // RN(1 / c) and RN((1 - RN(1 / c) * c) / c)
      const float c = sc[i == 0 ? S::kC1 : S::kC2], zh = 1.0f / c;
      sc[S::kCount + 2 * i] = zh, sc[S::kCount + 2 * i + 1] = std::fma(-zh, c, 1.0f) / c;
    }
    const auto t0 = std::chrono::steady_clock::now();
    Avx512<Kernel<AdamRule<false, true, true, false, false, false>, false, true>>(L, 0, blocks,
                                                                                 sc, codec);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                              .count());
  }
  uint64_t h = 1469598103934665603ull;  // FNV-1a of the final codes, scales and parameters
  auto mix = [&](const void* d, size_t bytes) {
    const auto* u = static_cast<const uint8_t*>(d);
    for (size_t i = 0; i < bytes; ++i) h = (h ^ u[i]) * 1099511628211ull;
  };
  mix(mu.data(), n), mix(nu.data(), n), mix(p.data(), 4 * n);
  mix(mu_scale.data(), 4 * blocks), mix(nu_scale.data(), 4 * blocks);
  std::printf("%.6f %016llx\n", best * 1e9 / n, static_cast<unsigned long long>(h));
}
"""

_SEARCH = "_mm_mask_storeu_epi8(codes + k, m, _mm512_cvtepi32_epi8(Search512(t, v)));"
_ENCODE_DIV = "const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), vdiv);"
_DECODE = (
    "DecodeAvx512(codecs[k], L.c_in[k] + start, L.sc_in[k][b], len, buf[k]);\n        continue;"
)

# name -> (what it does, same numbers as the kernel?, [(text in fused_step.cc, replacement)])
VARIANTS: dict[str, tuple[str, bool, list[tuple[str, str]]]] = {
    "kernel": ("the kernel as it is", True, []),
    "no code search": (
        "requantisation codes by truncation instead of the binary search",
        False,
        [(_SEARCH, _SEARCH.replace("Search512(t, v)", "_mm512_cvttps_epi32(v)"))],
    ),
    "no requantisation division": (
        "each entry times its block's scale instead of divided by it",
        False,
        [(_ENCODE_DIV, _ENCODE_DIV.replace("_mm512_div_ps", "_mm512_mul_ps"))],
    ),
    "no bias-correction divisions": (
        "mu * c1 and nu * c2 in the rule instead of mu / c1 and nu / c2",
        False,
        [
            ("(gi / c1) : mu / c1;", "(gi / c1) : mu * c1;"),
            ("std::sqrt(nu / c2 + eps_root)", "std::sqrt(nu * c2 + eps_root)"),
        ],
    ),
    "no decode table": (
        "decoded value = code * scale (no map lookup)",
        False,
        [
            (
                _DECODE,
                "for (int i = 0; i < len; ++i) buf[k][i] = L.c_in[k][start + i] * "
                "L.sc_in[k][b];\n        continue;",
            )
        ],
    ),
    "reciprocal bias corrections": (
        "the rule's mu / c1 and nu / c2 by the reciprocal sequence (exact only where the "
        "moment and its quotient stay in float32's normal range; the kernel would need a "
        "fallback for the rest)",
        True,
        [
            (
                "(gi / c1) : mu / c1;",
                "(gi / c1) : [&] {\n"
                "      const float zh = sc[S::kCount], zl = sc[S::kCount + 1];\n"
                "      const float q0 = std::fma(mu, zh, mu * zl);\n"
                "      return std::fma(std::fma(-q0, c1, mu), zh, q0);\n"
                "    }();",
            ),
            (
                "std::sqrt(nu / c2 + eps_root)",
                "std::sqrt([&] {\n"
                "      const float zh = sc[S::kCount + 2], zl = sc[S::kCount + 3];\n"
                "      const float q0 = std::fma(nu, zh, nu * zl);\n"
                "      return std::fma(std::fma(-q0, c2, nu), zh, q0);\n"
                "    }() + eps_root)",
            ),
        ],
    ),
    "gather search": (
        "the cell table read by AVX-512 gathers instead of the permute binary search",
        True,
        [
            (
                _SEARCH,
                """{
      const __m512i b = _mm512_castps_si512(v);
      __m512i a = _mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff));
      a = _mm512_min_epu32(_mm512_max_epu32(a, _mm512_set1_epi32(c.lo_bits)),
                           _mm512_set1_epi32(0x3f800000));
      const __m512i ck = _mm512_srl_epi32(_mm512_sub_epi32(a, _mm512_set1_epi32(c.lo_bits)),
                                          _mm_cvtsi32_si128(c.shift));
      const __m512i cell = _mm512_mask_sub_epi32(
          _mm512_add_epi32(_mm512_set1_epi32(c.half), ck), _mm512_movepi32_mask(b),
          _mm512_set1_epi32(c.half - 1), ck);
      const __m512i base = _mm512_and_si512(
          _mm512_i32gather_epi32(cell, (const int*)c.cells.data(), 1), _mm512_set1_epi32(0xff));
      const __mmask16 up =
          _mm512_cmp_ps_mask(_mm512_i32gather_ps(base, c.points, 4), v, _CMP_LE_OQ);
      const __m512i code = _mm512_mask_add_epi32(base, up, base, _mm512_set1_epi32(1));
      _mm_mask_storeu_epi8(codes + k, m, _mm512_cvtepi32_epi8(code));
    }""",
            )
        ],
    ),
    "reciprocal division": (
        "the requantisation's x / scale by RN(1/scale) and Markstein's correction "
        "(exact for rmsjax's codec: its breakpoints are >= 2**-39, the scales of this run are "
        "in [2**-60, 2**60])",
        True,
        [
            (
                "const __m512 vdiv = _mm512_set1_ps(div);",
                "const __m512 vdiv = _mm512_set1_ps(div);\n"
                "  const float zh_ = 1.0f / div;\n"
                "  const __m512 vzh = _mm512_set1_ps(zh_);\n"
                "  const __m512 vzl = _mm512_set1_ps(std::fma(-zh_, div, 1.0f) / div);",
            ),
            (
                _ENCODE_DIV,
                "const __m512 x_ = _mm512_maskz_loadu_ps(m, x + k);\n"
                "    const __m512 q0_ = _mm512_fmadd_ps(x_, vzh, _mm512_mul_ps(x_, vzl));\n"
                "    const __m512 v = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0_, vdiv, x_), vzh, q0_);",
            ),
        ],
    ),
}


def _build(name: str, workdir: Path, include: Path, cxx: list[str]) -> Path:
    text = build.SOURCE.read_text()
    for old, new in VARIANTS[name][2]:
        if old not in text:
            raise SystemExit(
                f"variant {name!r}: the kernel source no longer contains {old!r}; update "
                "VARIANTS in benchmarks/kernel_ablation.py to the new source"
            )
        text = text.replace(old, new)
    slug = re.sub(r"\W+", "_", name)
    src = workdir / f"{slug}.cc"
    src.write_text(text)
    driver = workdir / f"{slug}_driver.cc"
    driver.write_text(DRIVER.replace("#include SOURCE", f'#include "{src}"'))
    exe = workdir / slug
    cmd = build.compiler_command(cxx, include, exe, driver, header_dir=workdir)
    cmd = [a for a in cmd if a not in ("-shared", "-fPIC")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"variant {name!r} did not compile:\n{proc.stderr[-3000:]}")
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 20, help="entries of the leaf")
    ap.add_argument("--reps", type=int, default=40, help="calls per version (fastest kept)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    ap.add_argument("--out", default=str(HERE / "results" / "lowbit"), help="output folder")
    args = ap.parse_args()
    include = build.ffi_include_dir()
    if include is None:
        raise SystemExit("jaxlib's XLA FFI headers were not found")
    cxx = build.require_compiler()
    with tempfile.TemporaryDirectory(prefix="rmsjax-ablation-") as tmp:
        work = Path(tmp)
        (work / build.HEADER_NAME).write_text(build.header())
        ops = []
        for signed, slot in ((True, "mu"), (False, "nu")):
            path = work / f"codec_{slot}.bin"
            codecs.operand(moment_codec(8, signed=signed)).tofile(path)
            ops.append(str(path))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            built = pool.map(lambda n: _build(n, work, include, cxx), VARIANTS)
            exes = dict(zip(VARIANTS, built, strict=True))
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        digest: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, exe in exes.items():
                run = [str(exe), *ops, str(args.elements), str(args.reps)]
                ns, h = subprocess.run(
                    run, capture_output=True, text=True, check=True
                ).stdout.split()
                times[name].append(float(ns))
                digest[name] = h
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    base = med["kernel"]
    rows = []
    for name, (what, exact, _) in VARIANTS.items():
        same = digest[name] == digest["kernel"]
        if exact and not same:
            raise SystemExit(f"variant {name!r} should compute the kernel's numbers but does not")
        rows.append(
            dict(
                version=name,
                change=what,
                ns_per_element=round(med[name], 3),
                vs_kernel=round(med[name] - base, 3),
                same_numbers=same,
            )
        )
    head = (
        f"Machine: {describe()}. One thread, the AVX-512 8-bit AdamW loop over {args.elements} "
        f"entries (rows of 4096, blocks of 256), fastest of {args.reps} calls, median of "
        f"{args.rounds} interleaved rounds. `vs kernel`: ns per element more (+) or less (-) "
        "than the kernel as it is; `same numbers`: codes, scales and parameters equal the "
        "kernel's bit for bit after every call."
    )
    lines = [
        head,
        "",
        "| version | change | ns / element | vs kernel | same numbers |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['version']} | {r['change']} | {r['ns_per_element']:.3f} | "
            f"{r['vs_kernel']:+.3f} | {'yes' if r['same_numbers'] else 'no'} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(dict(machine=describe(), rows=rows), indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
