// The one place that decides which instruction set the CPU kernels use.
//
// Levels, lowest first; each above scalar includes AVX2 + FMA + F16C:
//   scalar   portable C++ (any CPU, any architecture)
//   avx2     AVX2 + FMA + F16C: 256-bit integer dots via vpmaddubsw
//   avxvnni  + AVX-VNNI: 256-bit vpdpbusd (Alder Lake, Sapphire Rapids, Zen 5)
//   avx512   + AVX-512 F/BW/VL/DQ + VNNI: 512-bit vpdpbusd, 32 registers,
//            mask registers (Cascade/Ice Lake, Sapphire Rapids, Zen 4/5)
// Zen 4 has avx512 but not avxvnni: levels are not nested, each is checked on
// its own (CPUID, and XGETBV for the OS saving the wider registers).
//
// The level in effect is the best the CPU supports, or the one named by the
// environment variable PYQUANT_SIMD (read once); set_simd_level changes it at
// run time (tests run every level present). PYQUANT_SIMD_HIDE (a comma list
// of levels) makes the dispatcher treat those as absent, as on a smaller CPU. Asking for a level the CPU lacks
// is an error, never a path to an illegal instruction: kernels for a level
// are only ever called through simd_level().
#pragma once
#include <string>
#include <vector>

namespace pyquant {

enum class Simd { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512 = 3 };
constexpr int kSimdLevels = 4;

// The level kernels use now. Throws std::invalid_argument when PYQUANT_SIMD
// names an unknown level or one this CPU cannot run.
Simd simd_level();
// True when the CPU and OS can run `s`.
bool simd_supported(Simd s);
// "scalar", "avx2", "avxvnni", "avx512", or "best" (the default level: the
// environment's, else the best supported). Throws std::invalid_argument for an
// unknown name or an unsupported level; returns true otherwise.
bool set_simd_level(const std::string& level);
std::string simd_name(Simd s);
// Names of the supported levels, lowest first.
std::vector<std::string> simd_supported_names();

// Every level above scalar has AVX2 + FMA + F16C: the float kernels written
// for AVX2 run at all of them.
inline bool simd_has_avx2() { return simd_level() >= Simd::kAvx2; }
// The level is avx512 and the CPU has AVX512-BF16 (vdpbf16ps: Cooper Lake,
// Sapphire Rapids, Zen 4 and 5), not hidden by PYQUANT_SIMD_HIDE=avx512bf16.
// An extension of the avx512 level, not a level of its own: kernels that use
// it are chosen per call where that level runs.
bool simd_has_avx512_bf16();
// True in the emulated build (csrc/cpu/simd_emulation.h): every level is
// reported present and the wide ones run SIMDe's AVX2 versions of their
// instructions. For testing the wide kernels' logic on an AVX2 machine only.
bool simd_emulated();

}  // namespace pyquant

#if defined(__x86_64__) || defined(_M_X64)
#define PQ_X86 1
#define PQ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PQ_X86 0
#define PQ_TARGET_AVX2
#endif

// Whole translation units (or the tail of one) compiled for one level: put
// every #include above PQ_ISA_BEGIN so that library code (std::, inline
// helpers of shared headers) keeps the baseline encoding; only the functions
// defined between BEGIN and END get the wider instructions. (Compiling a file
// with -mavx512f instead would also emit AVX-512 copies of inline library
// functions, and the linker may keep those for every caller.)
#define PQ_TARGET_STR_AVX2 "avx2,fma,f16c"
#if defined(PQ_EMULATE_WIDE_SIMD)
// The emulated build (simd_emulation.h): the wide levels' intrinsics are
// SIMDe functions over AVX2, so their code is compiled for AVX2 alone and the
// compiler cannot emit an instruction this CPU lacks.
#define PQ_TARGET_STR_AVXVNNI PQ_TARGET_STR_AVX2
#define PQ_TARGET_STR_AVX512 PQ_TARGET_STR_AVX2
#define PQ_TARGET_STR_AVX512_BF16 PQ_TARGET_STR_AVX2
#else
#define PQ_TARGET_STR_AVXVNNI "avx2,fma,f16c,avxvnni"
#define PQ_TARGET_STR_AVX512 "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"
#define PQ_TARGET_STR_AVX512_BF16 PQ_TARGET_STR_AVX512 ",avx512bf16"
#endif
#if PQ_X86
// One function for the avx512 level (the float GEMM tiles): call it only where
// simd_level() says avx512.
#define PQ_TARGET_AVX512 __attribute__((target(PQ_TARGET_STR_AVX512)))
#else
#define PQ_TARGET_AVX512
#endif
#if defined(__clang__)
#define PQ_PRAGMA(x) _Pragma(#x)
#define PQ_ISA_BEGIN(str) PQ_PRAGMA(clang attribute push(__attribute__((target(str))), apply_to = function))
#define PQ_ISA_END PQ_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define PQ_PRAGMA(x) _Pragma(#x)
#define PQ_ISA_BEGIN(str) PQ_PRAGMA(GCC push_options) PQ_PRAGMA(GCC target(str))
#define PQ_ISA_END PQ_PRAGMA(GCC pop_options)
#endif
