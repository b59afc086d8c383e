#include "simd.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if PQ_X86
#include <cpuid.h>
#endif

namespace pyquant {
namespace {

constexpr const char* kNames[kSimdLevels] = {"scalar", "avx2", "avxvnni", "avx512"};

// What each level needs, for error messages.
constexpr const char* kNeeds[kSimdLevels] = {
    "nothing", "AVX2, FMA and F16C", "AVX2, FMA, F16C and AVX-VNNI",
    "AVX2, FMA, F16C and AVX-512 F/BW/VL/DQ with VNNI (and an OS that saves the AVX-512 state)"};

struct Cpu {
  bool level[kSimdLevels] = {true, false, false, false};
  bool avx512_bf16 = false;  // vdpbf16ps, on top of the avx512 level
};

#if PQ_X86
bool bit(unsigned v, int b) { return (v >> b) & 1u; }

// XCR0: which register states the OS saves on a context switch. AVX needs
// XMM|YMM (bits 1, 2); AVX-512 also opmask, ZMM0-15 upper halves, ZMM16-31
// (bits 5, 6, 7). A CPU with the instructions under an OS that does not save
// the registers must be treated as not having them.
unsigned long long xcr0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

Cpu detect() {
  Cpu c;
#if PQ_X86
  unsigned a, b, cx, d;
  if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
  const bool fma = bit(cx, 12), osxsave = bit(cx, 27), avx = bit(cx, 28), f16c = bit(cx, 29);
  if (!(osxsave && avx)) return c;
  const unsigned long long xcr = xcr0();
  if ((xcr & 0x6) != 0x6) return c;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return c;
  unsigned b7 = 0, c7 = 0, a71 = 0;
  __cpuid_count(7, 0, a, b7, c7, d);
  {
    unsigned bb, cc, dd;
    __cpuid_count(7, 1, a71, bb, cc, dd);
  }
  const bool avx2 = bit(b7, 5) && fma && f16c;
  const bool avx512 = bit(b7, 16) && bit(b7, 17) && bit(b7, 30) && bit(b7, 31)  // F, DQ, BW, VL
                      && bit(c7, 11)                                          // VNNI
                      && (xcr & 0xE0) == 0xE0;
  c.level[int(Simd::kAvx2)] = avx2;
  c.level[int(Simd::kAvxVnni)] = avx2 && bit(a71, 4);
  c.level[int(Simd::kAvx512)] = avx2 && avx512;
  c.avx512_bf16 = avx2 && avx512 && bit(a71, 5);
#if defined(PQ_EMULATE_WIDE_SIMD)
  // SIMDe runs the wide levels' intrinsics on AVX2 (simd_emulation.h).
  c.level[int(Simd::kAvxVnni)] = c.level[int(Simd::kAvx512)] = c.avx512_bf16 = avx2;
#endif
#endif
  return c;
}

// PYQUANT_SIMD_HIDE=avx512,avxvnni: treat those levels as absent, to see
// (and test) what a CPU without them gets: the fallbacks, and the errors.
// "avx512bf16" hides that extension alone (an avx512 CPU without it:
// Skylake-SP, Cascade Lake, Ice Lake); hiding avx512 hides it too.
Cpu with_hidden(Cpu c) {
  const char* env = std::getenv("PYQUANT_SIMD_HIDE");
  if (env == nullptr) return c;
  const std::string list = std::string(",") + env + ",";
  for (int l = 1; l < kSimdLevels; ++l)
    if (list.find(std::string(",") + kNames[l] + ",") != std::string::npos) c.level[l] = false;
  if (!c.level[int(Simd::kAvx512)] || list.find(",avx512bf16,") != std::string::npos) c.avx512_bf16 = false;
  return c;
}

const Cpu& cpu() {
  static const Cpu c = with_hidden(detect());
  return c;
}

Simd best_supported() {
  for (int l = kSimdLevels - 1; l > 0; --l)
    if (cpu().level[l]) return Simd(l);
  return Simd::kScalar;
}

std::string supported_list() {
  std::string s;
  for (const auto& n : simd_supported_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// The level a name asks for, checked against the CPU; `what` says who asked.
Simd parse(const std::string& name, const std::string& what) {
  for (int l = 0; l < kSimdLevels; ++l) {
    if (name != kNames[l]) continue;
    if (!cpu().level[l])
      throw std::invalid_argument(what + " asks for SIMD level '" + name + "', which needs " + kNeeds[l] +
                                  "; this CPU supports only: " + supported_list());
    return Simd(l);
  }
  throw std::invalid_argument(what + ": unknown SIMD level '" + name +
                              "' (levels: scalar, avx2, avxvnni, avx512, best)");
}

// The default level: PYQUANT_SIMD if set (and not "best"), else the best.
// A bad environment value is remembered and reported by every simd_level()
// call, so no kernel runs at a level nobody chose.
struct Default {
  Simd level = Simd::kScalar;
  std::string error;
};

const Default& default_level() {
  static const Default d = [] {
    Default r;
    const char* env = std::getenv("PYQUANT_SIMD");
    if (env == nullptr || *env == '\0' || std::string(env) == "best") {
      r.level = best_supported();
      return r;
    }
    try {
      r.level = parse(env, std::string("PYQUANT_SIMD=") + env);
    } catch (const std::invalid_argument& e) {
      r.error = e.what();
    }
    return r;
  }();
  return d;
}

// -1: not set at run time, use the default.
std::atomic<int>& forced() {
  static std::atomic<int> v{-1};
  return v;
}

}  // namespace

Simd simd_level() {
  const int f = forced().load(std::memory_order_relaxed);
  if (f >= 0) return Simd(f);
  const Default& d = default_level();
  if (!d.error.empty()) throw std::invalid_argument(d.error);
  return d.level;
}

bool simd_emulated() {
#if defined(PQ_EMULATE_WIDE_SIMD)
  return true;
#else
  return false;
#endif
}

bool simd_supported(Simd s) { return cpu().level[int(s)]; }

bool simd_has_avx512_bf16() { return cpu().avx512_bf16 && simd_level() == Simd::kAvx512; }

bool set_simd_level(const std::string& level) {
  if (level == "best") {
    const Default& d = default_level();
    if (!d.error.empty()) throw std::invalid_argument(d.error);
    forced().store(-1, std::memory_order_relaxed);
    return true;
  }
  forced().store(int(parse(level, "set_simd_level")), std::memory_order_relaxed);
  return true;
}

std::string simd_name(Simd s) { return kNames[int(s)]; }

std::vector<std::string> simd_supported_names() {
  std::vector<std::string> out;
  for (int l = 0; l < kSimdLevels; ++l)
    if (cpu().level[l]) out.push_back(kNames[l]);
  return out;
}

}  // namespace pyquant
