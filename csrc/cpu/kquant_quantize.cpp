// Fast path of the k-quant quantizers (Q2_K..Q6_K): the same computation as
// the pure-torch spec pyquant/algorithms/kquant_reference.py, one super-block
// at a time, OpenMP over super-blocks. The spec documents the algorithm; this
// file only has to produce the same bytes, which means:
//  * fp32 operations in the spec's order, left-to-right sums, and no fused
//    multiply-add: a contracted a*b+c rounds once instead of twice and flips
//    the scale searches (hence fp_contract_off.h; baseline x86-64 has no
//    FMA anyway, aarch64 has and GCC would contract by default);
//  * sqrtf is the correctly rounded instruction (sqrtss), which the spec
//    reproduces explicitly because torch's CPU sqrt is not;
//  * integers stored into uint8_t/int8_t wrap, as in llama.cpp.
// Input is validated in Python (finite, K % 256 == 0, importance >= 0).
#include "fp_contract_off.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "kquant_kernels.h"
#include "pyquant/gguf_blocks.h"

namespace pyquant {
namespace {

constexpr int kSuper = gguf::kQK;
constexpr float kTinyGroup = 1e-15f;  // groups below this amax quantize to zero

// Round to nearest (ties to even) by adding 1.5*2^23 and reading the low
// mantissa bits: exactly the rounding llama.cpp uses, including the values it
// yields outside +-2^22 (degenerate ratios, clamped afterwards by callers).
inline int magic_round(float v) {
  const float t = v + 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  return (bits & 0x7fffff) - 0x400000;
}

inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// fp32 -> fp16 bits, round to nearest even (what a hardware cvtss2sh does).
inline uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to Inf
  if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);            // <= 2^-25 rounds to 0
  if (ax < 0x38800000u) {  // fp16 subnormal: count units of 2^-24
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(ax >> 23);  // 14..24 here
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return static_cast<uint16_t>(sign | h);
}

inline float from_half(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (e == 31 ? (0xffu << 23) | (m << 13) : ((e + 112u) << 23) | (m << 13));
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline void put_half(uint8_t* p, float v) {
  const uint16_t h = to_half(v);
  p[0] = static_cast<uint8_t>(h & 0xff);
  p[1] = static_cast<uint8_t>(h >> 8);
}

// First element of largest magnitude (strictly larger wins), from 0.
inline float signed_absmax(int n, const float* x, float* amax_out) {
  float amax = 0.f, v = 0.f;
  for (int i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) {
      amax = a;
      v = x[i];
    }
  }
  *amax_out = amax;
  return v;
}

// --- scale searches --------------------------------------------------------------

// Symmetric codes in [-nmax, nmax) with the rmse-weighted -9..9 search
// (weights qw, or x^2 when qw is null). L gets code + nmax.
float symmetric_search(int n, int nmax, const float* x, const float* qw, int8_t* L) {
  float amax;
  const float vmax = signed_absmax(n, x, &amax);
  if (amax < kTinyGroup) {
    std::memset(L, 0, n);
    return 0.f;
  }
  float sumlx = 0.f, suml2 = 0.f;
  float iscale = static_cast<float>(-nmax) / vmax;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(magic_round(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = qw ? qw[i] : x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  float scale = suml2 != 0.f ? sumlx / suml2 : 0.f;
  float best = scale * sumlx;
  for (int step = -9; step <= 9; ++step) {
    if (step == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(step)) / vmax;
    float slx = 0.f, sl2 = 0.f;
    for (int i = 0; i < n; ++i) {
      const float l = static_cast<float>(clampi(magic_round(iscale * x[i]), -nmax, nmax - 1));
      const float w = qw ? qw[i] : x[i] * x[i];
      slx += w * x[i] * l;
      sl2 += w * l * l;
    }
    if (sl2 > 0.f && slx * slx > best * sl2) {
      for (int i = 0; i < n; ++i)
        L[i] = static_cast<int8_t>(clampi(magic_round(iscale * x[i]), -nmax, nmax - 1) + nmax);
      scale = slx / sl2;
      best = scale * slx;
    }
  }
  return scale;
}

// Q3_K's symmetric codes with x^2 weights, refined one element at a time.
float q3_search(int n, int nmax, const float* x, int8_t* L) {
  float amax;
  const float vmax = signed_absmax(n, x, &amax);
  if (amax < kTinyGroup) {
    std::memset(L, 0, n);
    return 0.f;
  }
  const float iscale = static_cast<float>(-nmax) / vmax;
  float sumlx = 0.f, suml2 = 0.f;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(magic_round(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      const float li = static_cast<float>(L[i]);
      float slx = sumlx - w * x[i] * li;
      if (!(slx > 0.f)) continue;
      float sl2 = suml2 - w * li * li;
      const int nl = clampi(magic_round(x[i] * sl2 / slx), -nmax, nmax - 1);
      if (nl == L[i]) continue;
      slx += w * x[i] * static_cast<float>(nl);
      sl2 += w * static_cast<float>(nl) * static_cast<float>(nl);
      if (sl2 > 0.f && slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = static_cast<int8_t>(nl);
        sumlx = slx;
        suml2 = sl2;
        ++changed;
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.f ? sumlx / suml2 : 0.f;
}

// Codes in [0, nmax] with a scale and a min <= 0 (returned negated in
// *neg_min), searching iscale = (rmin + rdelta*step + nmax) / (max - min) from
// the running best min. clamp_first: the newer form that clamps v before
// rounding (the importance path); otherwise the rounded value is clamped.
float asymmetric_search(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min, float rmin,
                        float rdelta, int nsteps, bool use_mad, bool clamp_first) {
  float lo = x[0], hi = x[0];
  float sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0.f) lo = 0.f;
  if (clamp_first ? !(hi > lo) : hi == lo) {
    std::memset(L, 0, n);
    *neg_min = -lo;
    return 0.f;
  }
  const float fmax = static_cast<float>(nmax);
  auto error = [&](float scale, float mn, const uint8_t* codes) {
    float e = 0.f;
    for (int i = 0; i < n; ++i) {
      float diff = scale * static_cast<float>(codes[i]) + mn - x[i];
      diff = use_mad ? std::fabs(diff) : diff * diff;
      e += w[i] * diff;
    }
    return e;
  };
  float iscale = fmax / (hi - lo);
  float scale = 1.f / iscale;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(clampi(magic_round(iscale * (x[i] - lo)), 0, nmax));
  float best = error(scale, lo, L);
  uint8_t cand[32];
  for (int step = 0; step <= nsteps; ++step) {
    iscale = (rmin + rdelta * static_cast<float>(step) + fmax) / (hi - lo);
    float sum_l = 0.f, sum_l2 = 0.f, sum_xl = 0.f;
    for (int i = 0; i < n; ++i) {
      const float v = iscale * (x[i] - lo);
      int l;
      if (clamp_first)
        l = v > 0.f ? magic_round(v < fmax ? v : fmax) : 0;
      else
        l = clampi(magic_round(v), 0, nmax);
      cand[i] = static_cast<uint8_t>(l);
      const float wl = w[i] * static_cast<float>(l);
      sum_l += wl;
      sum_l2 += wl * static_cast<float>(l);
      sum_xl += wl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (!(D > 0.f)) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    if (this_min > 0.f) {
      this_min = 0.f;
      this_scale = sum_xl / sum_l2;
    }
    const float e = error(this_scale, this_min, cand);
    if (e < best) {
      std::memcpy(L, cand, n);
      best = e;
      scale = this_scale;
      lo = this_min;
    }
  }
  *neg_min = -lo;
  return scale;
}

// Unsigned codes in [0, nmax] (as uint8: a negative code wraps, as in C) for
// the non-negative sub-block scales/mins, weighted by qw.
float unsigned_search(int n, int nmax, const float* x, const float* qw, uint8_t* L) {
  float vmax = 0.f;
  for (int i = 0; i < n; ++i) vmax = vmax > x[i] ? vmax : x[i];
  if (vmax < kTinyGroup) {
    std::memset(L, 0, n);
    return 0.f;
  }
  const float fmax = static_cast<float>(nmax);
  float iscale = fmax / vmax;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(magic_round(iscale * x[i]));
  const float scale0 = 1.f / iscale;
  float best = 0.f;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale0 * static_cast<float>(L[i]);
    best += qw[i] * diff * diff;
  }
  for (int step = -4; step <= 4; ++step) {
    if (step == 0) continue;
    const float is_ = (0.1f * static_cast<float>(step) + fmax) / vmax;
    const float s_ = 1.f / is_;
    float mse = 0.f;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, magic_round(is_ * x[i]));
      const float diff = x[i] - s_ * static_cast<float>(l);
      mse += qw[i] * diff * diff;
    }
    if (mse < best) {
      best = mse;
      iscale = is_;
    }
  }
  float sumlx = 0.f, suml2 = 0.f;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, magic_round(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    sumlx += qw[i] * x[i] * static_cast<float>(l);
    suml2 += qw[i] * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = qw[i], li = static_cast<float>(L[i]);
      float slx = sumlx - w * x[i] * li;
      float sl2 = suml2 - w * li * li;
      if (!(slx > 0.f && sl2 > 0.f)) continue;
      const int nl = std::min(nmax, magic_round(x[i] * sl2 / slx));
      if (nl == static_cast<int>(L[i])) continue;
      slx += w * x[i] * static_cast<float>(nl);
      sl2 += w * static_cast<float>(nl) * static_cast<float>(nl);
      if (slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = static_cast<uint8_t>(nl);
        sumlx = slx;
        suml2 = sl2;
        ++changed;
      }
    }
    if (!changed) break;
  }
  return suml2 > 0.f ? sumlx / suml2 : 0.f;
}

// --- shared pieces of the block writers -------------------------------------------

inline float block_sumsq(const float* x) {
  float s = 0.f;
  for (int i = 0; i < kSuper; ++i) s += x[i] * x[i];
  return s;
}

// qw * sqrt(sigma2 + x^2) for n elements.
inline void importance(int n, const float* x, const float* qw, float sigma2, float* w) {
  for (int i = 0; i < n; ++i) w[i] = qw[i] * std::sqrt(sigma2 + x[i] * x[i]);
}

// Codes 0..3 of 256 weights -> 64 bytes, byte 32h+l holding q[128h + 32k + l] at bits 2k.
inline void pack_2bit(const uint8_t* q, uint8_t* out) {
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* s = q + 128 * h + l;
      out[32 * h + l] = static_cast<uint8_t>((s[0] & 3) | ((s[32] & 3) << 2) | ((s[64] & 3) << 4) | ((s[96] & 3) << 6));
    }
}

// One bit per weight -> 32 bytes, byte l bit i = bit of weight 32i + l.
inline void pack_bitplanes(const uint8_t* bits, uint8_t* out) {
  for (int l = 0; l < 32; ++l) {
    uint8_t b = 0;
    for (int i = 0; i < 8; ++i) b = static_cast<uint8_t>(b | ((bits[32 * i + l] & 1) << i));
    out[l] = b;
  }
}

// The 12 scale/min bytes of Q4_K/Q5_K, built with the same (unmasked) stores
// as llama.cpp, and their six-bit read-back.
inline void pack_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(ls[j] | ((ls[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>(lm[j] | ((lm[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((ls[j + 4] & 0xf) | ((lm[j + 4] & 0xf) << 4));
  }
}

inline void unpack_k4(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

inline void pack_q3_scales(const int* l6, uint8_t* s) {
  std::memset(s, 0, 12);
  for (int j = 0; j < 16; ++j) {
    if (j < 8)
      s[j] = static_cast<uint8_t>(l6[j] & 0xf);
    else
      s[j - 8] = static_cast<uint8_t>(s[j - 8] | ((l6[j] & 0xf) << 4));
    s[8 + j % 4] = static_cast<uint8_t>(s[8 + j % 4] | ((l6[j] >> 4) << (2 * (j / 4))));
  }
}

inline int q3_scale(const uint8_t* s, int j) {
  const int low = j < 8 ? (s[j] & 0xf) : (s[j - 8] >> 4);
  return (low | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
}

// --- the five block writers ---------------------------------------------------------

void block_q2_k(const float* x, const float* qw, uint8_t* out) {
  uint8_t L[kSuper], Ls[16], Lm[16];
  float scales[16], mins[16], w[16], sw[16];
  uint8_t* bytes = out;  // scales[16] | qs[64] | d | dmin
  float d, dmin;
  if (!qw) {
    float max_scale = 0.f, max_min = 0.f;
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) w[l] = std::fabs(x[16 * j + l]);
      scales[j] = asymmetric_search(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, true, false);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    float dv = 0.f, mv = 0.f;
    std::memset(bytes, 0, 16);
    if (max_scale > 0.f) {
      const float is = 15.f / max_scale;
      for (int j = 0; j < 16; ++j) bytes[j] = static_cast<uint8_t>(magic_round(is * scales[j]));
      dv = max_scale / 15.f;
    }
    if (max_min > 0.f) {
      const float is = 15.f / max_min;
      for (int j = 0; j < 16; ++j) {
        const uint32_t lm = static_cast<uint32_t>(magic_round(is * mins[j]));
        bytes[j] = static_cast<uint8_t>(bytes[j] | (lm << 4));
      }
      mv = max_min / 15.f;
    }
    put_half(out + 80, dv);
    put_half(out + 82, mv);
  } else {
    const float sigma2 = block_sumsq(x) / 256.f;
    for (int j = 0; j < 16; ++j) {
      importance(16, x + 16 * j, qw + 16 * j, sigma2, w);
      float s = 0.f;
      for (int l = 0; l < 16; ++l) s += w[l];
      sw[j] = s;
      scales[j] = asymmetric_search(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.9f, 0.05f, 36, false, true);
    }
    const float dv = unsigned_search(16, 15, scales, sw, Ls);
    const float mv = unsigned_search(16, 15, mins, sw, Lm);
    put_half(out + 80, dv);
    put_half(out + 82, mv);
    for (int j = 0; j < 16; ++j) bytes[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
  }
  d = from_half(static_cast<uint16_t>(out[80] | (out[81] << 8)));
  dmin = from_half(static_cast<uint16_t>(out[82] | (out[83] << 8)));
  for (int j = 0; j < 16; ++j) {
    const float dj = d * static_cast<float>(bytes[j] & 0xf);
    if (dj == 0.f) continue;
    const float mj = dmin * static_cast<float>(bytes[j] >> 4);
    for (int l = 0; l < 16; ++l)
      L[16 * j + l] = static_cast<uint8_t>(clampi(magic_round((x[16 * j + l] + mj) / dj), 0, 3));
  }
  pack_2bit(L, out + 16);
}

void block_q3_k(const float* x, const float* qw, uint8_t* out) {
  int8_t L[kSuper];
  float scales[16];
  uint8_t* s = out + 96;  // hmask[32] | qs[64] | scales[12] | d
  if (!qw) {
    float amax = 0.f, max_scale = 0.f;
    for (int j = 0; j < 16; ++j) {
      scales[j] = q3_search(16, 4, x + 16 * j, L + 16 * j);
      const float a = std::fabs(scales[j]);
      if (a > amax) {
        amax = a;
        max_scale = scales[j];
      }
    }
    std::memset(s, 0, 12);
    float dv = 0.f;
    if (max_scale != 0.f) {
      const float is = -32.f / max_scale;
      int l6[16];
      for (int j = 0; j < 16; ++j) {
        const int8_t l = static_cast<int8_t>(magic_round(is * scales[j]));
        l6[j] = clampi(l, -32, 31) + 32;
      }
      pack_q3_scales(l6, s);
      dv = 1.f / is;
    }
    put_half(out + 108, dv);
  } else {
    float w[16], sw[16];
    int8_t Ls[16];
    const float sigma2 = 2.f * block_sumsq(x) / 256.f;
    for (int j = 0; j < 16; ++j) {
      importance(16, x + 16 * j, qw + 16 * j, sigma2, w);
      float t = 0.f;
      for (int l = 0; l < 16; ++l) t += w[l];
      sw[j] = t;
      scales[j] = symmetric_search(16, 4, x + 16 * j, w, L + 16 * j);
    }
    const float dv = symmetric_search(16, 32, scales, sw, Ls);
    int l6[16];
    for (int j = 0; j < 16; ++j) l6[j] = Ls[j];
    pack_q3_scales(l6, s);
    put_half(out + 108, dv);
  }
  const float d = from_half(static_cast<uint16_t>(out[108] | (out[109] << 8)));
  for (int j = 0; j < 16; ++j) {
    const float dj = d * static_cast<float>(q3_scale(s, j));
    if (dj == 0.f) continue;
    for (int l = 0; l < 16; ++l)
      L[16 * j + l] = static_cast<int8_t>(clampi(magic_round(x[16 * j + l] / dj), -4, 3) + 4);
  }
  uint8_t q[kSuper], hi[kSuper];
  for (int i = 0; i < kSuper; ++i) {
    q[i] = static_cast<uint8_t>(L[i] & 3);
    hi[i] = static_cast<uint8_t>(L[i] > 3);
  }
  pack_bitplanes(hi, out);
  pack_2bit(q, out + 32);
}

void block_q45_k(const float* x, const float* qw, uint8_t* out, bool five) {
  const int nmax = five ? 31 : 15;
  uint8_t L[kSuper], ls[8], lm[8];
  float scales[8], mins[8], w[32];
  uint8_t* s = out + 4;  // d | dmin | scales[12] | (qh[32] |) qs[128]
  if (!qw) {
    float max_scale = 0.f, max_min = 0.f;
    for (int j = 0; j < 8; ++j) {
      const float* xs = x + 32 * j;
      float sum_x2 = 0.f;
      for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
      const float av_x = std::sqrt(sum_x2 / 32.f);
      for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
      scales[j] = five ? asymmetric_search(32, 31, xs, w, L + 32 * j, &mins[j], -0.5f, 0.1f, 15, false, false)
                       : asymmetric_search(32, 15, xs, w, L + 32 * j, &mins[j], -1.f, 0.1f, 20, false, false);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0.f ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0.f ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(magic_round(inv_scale * scales[j])));
      lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(magic_round(inv_min * mins[j])));
    }
    put_half(out, max_scale / 63.f);
    put_half(out + 2, max_min / 63.f);
  } else {
    float sw[8];
    const float sigma2 = 2.f * block_sumsq(x) / 256.f;
    for (int j = 0; j < 8; ++j) {
      importance(32, x + 32 * j, qw + 32 * j, sigma2, w);
      float t = 0.f;
      for (int l = 0; l < 32; ++l) t += w[l];
      sw[j] = t;
      scales[j] = asymmetric_search(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], -0.9f, 0.05f, 36, false, true);
    }
    const float dv = unsigned_search(8, 63, scales, sw, ls);
    const float mv = unsigned_search(8, 63, mins, sw, lm);
    if (five) {  // only Q5_K's importance path clamps the wrapped codes
      for (int j = 0; j < 8; ++j) {
        ls[j] = std::min<uint8_t>(63, ls[j]);
        lm[j] = std::min<uint8_t>(63, lm[j]);
      }
    }
    put_half(out, dv);
    put_half(out + 2, mv);
  }
  pack_k4(ls, lm, s);
  const float d = from_half(static_cast<uint16_t>(out[0] | (out[1] << 8)));
  const float dmin = from_half(static_cast<uint16_t>(out[2] | (out[3] << 8)));
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    unpack_k4(s, j, &sc, &mn);
    const float dj = d * static_cast<float>(sc);
    if (dj == 0.f) continue;
    const float mj = dmin * static_cast<float>(mn);
    for (int l = 0; l < 32; ++l)
      L[32 * j + l] = static_cast<uint8_t>(clampi(magic_round((x[32 * j + l] + mj) / dj), 0, nmax));
  }
  uint8_t* qs = out + (five ? 48 : 16);
  if (five) {
    uint8_t hi[kSuper];
    for (int i = 0; i < kSuper; ++i) hi[i] = static_cast<uint8_t>(L[i] >> 4);
    pack_bitplanes(hi, out + 16);
  }
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l)
      qs[32 * c + l] = static_cast<uint8_t>((L[64 * c + l] & 0xf) | ((L[64 * c + 32 + l] & 0xf) << 4));
}

void block_q6_k(const float* x, const float* qw, uint8_t* out) {
  int8_t L[kSuper];
  float scales[16];
  float amax = 0.f, max_scale = 0.f;
  for (int j = 0; j < 16; ++j) {
    scales[j] = symmetric_search(16, 32, x + 16 * j, qw ? qw + 16 * j : nullptr, L + 16 * j);
    const float a = std::fabs(scales[j]);
    if (a > amax) {
      amax = a;
      max_scale = scales[j];
    }
  }
  if (amax < kTinyGroup) {
    std::memset(out, 0, 210);
    return;
  }
  // ql[128] | qh[64] | scales[16] int8 | d
  const float is = -128.f / max_scale;
  put_half(out + 208, 1.f / is);
  int8_t* sc = reinterpret_cast<int8_t*>(out + 192);
  for (int j = 0; j < 16; ++j) sc[j] = static_cast<int8_t>(std::min(127, magic_round(is * scales[j])));
  const float d = from_half(static_cast<uint16_t>(out[208] | (out[209] << 8)));
  for (int j = 0; j < 16; ++j) {
    const float dj = d * static_cast<float>(sc[j]);
    if (dj == 0.f) continue;
    for (int l = 0; l < 16; ++l)
      L[16 * j + l] = static_cast<int8_t>(clampi(magic_round(x[16 * j + l] / dj), -32, 31) + 32);
  }
  for (int h = 0; h < 2; ++h) {
    const int8_t* q = L + 128 * h;
    uint8_t* ql = out + 64 * h;
    uint8_t* qh = out + 128 + 32 * h;
    for (int l = 0; l < 32; ++l) {
      ql[l] = static_cast<uint8_t>((q[l] & 0xf) | ((q[l + 64] & 0xf) << 4));
      ql[l + 32] = static_cast<uint8_t>((q[l + 32] & 0xf) | ((q[l + 96] & 0xf) << 4));
      qh[l] = static_cast<uint8_t>(((q[l] >> 4) & 3) | (((q[l + 32] >> 4) & 3) << 2) | (((q[l + 64] >> 4) & 3) << 4) |
                                   (((q[l + 96] >> 4) & 3) << 6));
    }
  }
}

}  // namespace

void kquant_quantize(int ggml_type, const float* x, const float* qw, int64_t nrows, int64_t k, uint8_t* out,
                     int nthreads) {
  if (!gguf::is_kquant(ggml_type)) throw std::invalid_argument("kquant_quantize: not a k-quant ggml type");
  const int ts = gguf::type_size(ggml_type);
  const int64_t nb = k / kSuper, total = nrows * nb;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < total; ++b) {
    const float* xb = x + b * kSuper;
    const float* qb = qw ? qw + (b % nb) * kSuper : nullptr;
    uint8_t* ob = out + b * ts;
    switch (ggml_type) {
      case gguf::kQ2_K: block_q2_k(xb, qb, ob); break;
      case gguf::kQ3_K: block_q3_k(xb, qb, ob); break;
      case gguf::kQ4_K: block_q45_k(xb, qb, ob, false); break;
      case gguf::kQ5_K: block_q45_k(xb, qb, ob, true); break;
      default: block_q6_k(xb, qb, ob); break;
    }
  }
}

}  // namespace pyquant
