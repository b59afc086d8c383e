// q8 kernels in portable C++ (the scalar level): the semantics of every
// integer-dot kernel spelled out one code at a time, in natural order. The
// SIMD levels are tested against the same spec (tests/ops/q8_spec.py).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "q8_kernels.h"

namespace pyquant {
namespace q8 {
namespace {

using namespace gguf;

float rne(float v) { return std::nearbyint(v); }  // default rounding mode: to nearest even

// One row of x (k values in x_dtype) as fp32, zero-padded to kp.
void row_f32(const void* x, int dtype, int64_t row, int64_t k, int64_t kp, float* out) {
  for (int64_t j = 0; j < k; ++j) out[j] = load_float(x, row * k + j, dtype);
  for (int64_t j = k; j < kp; ++j) out[j] = 0.0f;
}

// ggml's quantize_row_q8_0/q8_1 (x86) for one block of 32, or the fp32-d
// variant (Q8_32), or its two planes (Q8x2_32: the residual rounded once,
// then scaled by 256 / d and rounded, clamped to +-127); d = amax / 127 with
// amax over the block, or over its span of blocks (Acts::span, Q8x2_32).
void quantize_block32(const float* x, ActKind kind, float amax, int8_t* q, int8_t* q2, float& d, float& s,
                      int32_t& isum, int32_t* isum1) {
  const float dd = amax / 127.0f;
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  int32_t sum = 0, sum2 = 0;
  for (int j = 0; j < kBlock; ++j) {
    q[j] = int8_t(rne(x[j] * id));
    sum += q[j];
    if (kind == ActKind::kQ8x2_32) {
      const float r = std::fma(-dd, float(q[j]), x[j]);
      const float v = std::fmin(std::fmax(rne(r * (id * 256.0f)), -127.0f), 127.0f);
      q2[j] = int8_t(v);
      sum2 += q2[j];
    }
  }
  isum = kind == ActKind::kQ8x2_32 ? 256 * sum + sum2 : sum;  // Q8x2_32: the combined codes 256 q + q2
  if (kind == ActKind::kQ8x2_32) {
    d = dd;
    *isum1 = sum;
    s = (dd * (1.0f / 256.0f)) * float(isum);
  } else if (kind == ActKind::kQ8_32) {
    d = dd;
    s = dd * float(sum);
  } else {
    d = half_bits_to_float(float_to_half_rne(dd));
    s = kind == ActKind::kQ8_1 ? half_bits_to_float(float_to_half_rne(dd * float(sum))) : d * float(sum);
  }
}

// ggml's quantize_row_q8_K_ref for one block of 256.
void quantize_block256(const float* x, int8_t* q, float& d, int16_t* bsums) {
  float amax = 0.0f, vmax = 0.0f;
  for (int j = 0; j < kSuper; ++j) {
    const float ax = std::fabs(x[j]);
    if (ax > amax) {
      amax = ax;
      vmax = x[j];
    }
  }
  if (amax == 0.0f) {
    d = 0.0f;
    std::memset(q, 0, kSuper);
    for (int j = 0; j < kSuper / 16; ++j) bsums[j] = 0;
    return;
  }
  const float iscale = -127.0f / vmax;
  for (int j = 0; j < kSuper; ++j) {
    const int v = int(rne(iscale * x[j]));
    q[j] = int8_t(v < 127 ? v : 127);
  }
  for (int j = 0; j < kSuper / 16; ++j) {
    int sum = 0;
    for (int i = 0; i < 16; ++i) sum += q[j * 16 + i];
    bsums[j] = int16_t(sum);
  }
  d = 1.0f / iscale;
}

void quantize(const void* x, int x_dtype, Acts& a) {
  std::vector<float> row(size_t(a.kp));
  for (int64_t r = 0; r < a.m; ++r) {
    row_f32(x, x_dtype, r, a.k, a.kp, row.data());
    int8_t* q = a.qs + r * a.kp;
    if (a.kind == ActKind::kQ8_K) {
      for (int64_t b = 0; b < a.nb; ++b)
        quantize_block256(row.data() + b * kSuper, q + b * kSuper, a.d[r * a.nb + b], a.bsums + r * (a.kp / 16) + b * 16);
    } else {
      float amax = 0.0f;
      for (int64_t b = 0; b < a.nb; ++b) {
        if (b % a.span == 0) {
          const int64_t end = std::min<int64_t>(b + a.span, a.nb) * kBlock;
          amax = 0.0f;
          for (int64_t j = b * kBlock; j < end; ++j) amax = std::fmax(amax, std::fabs(row[size_t(j)]));
        }
        quantize_block32(row.data() + b * kBlock, a.kind, amax, q + b * kBlock,
                         a.qs2 ? a.qs2 + r * a.kp + b * kBlock : nullptr, a.d[r * a.nb + b], a.s[r * a.nb + b],
                         a.isum[r * a.nb + b], a.isum1 ? a.isum1 + r * a.nb + b : nullptr);
      }
      if (a.dl)
        for (int64_t l = 0; l < a.kp / 4; ++l)
          a.dl[r * (a.kp / 4) + l] = a.d[r * a.nb + l / 8] * (a.qs2 ? 1.0f / 256.0f : 1.0f);
    }
  }
}

// ---- GGUF: one block's contribution, as ggml's vec_dot computes it ---------------

// Legacy types: acc += fp32(d_w) * fp32(d_x) * sum(w * x); Q4_1/Q5_1 also
// summs += m_w * s_x.
template <int T>
void dot_legacy(const uint8_t* blk, const int8_t* xq, float dx, float sx, float& acc, float& summs) {
  int32_t sum = 0;
  float dw = 0.0f, mw = 0.0f;
  if constexpr (T == kQ4_0) {
    dw = load_f16(blk + LayoutQ4_0::kD);
    for (int i = 0; i < 32; ++i) sum += (nibble32(blk + LayoutQ4_0::kQs, i) - 8) * xq[i];
  } else if constexpr (T == kQ4_1) {
    dw = load_f16(blk + LayoutQ4_1::kD), mw = load_f16(blk + LayoutQ4_1::kM);
    for (int i = 0; i < 32; ++i) sum += nibble32(blk + LayoutQ4_1::kQs, i) * xq[i];
  } else if constexpr (T == kQ5_0) {
    dw = load_f16(blk + LayoutQ5_0::kD);
    for (int i = 0; i < 32; ++i) sum += (q5_code(blk + LayoutQ5_0::kQh, blk + LayoutQ5_0::kQs, i) - 16) * xq[i];
  } else if constexpr (T == kQ5_1) {
    dw = load_f16(blk + LayoutQ5_1::kD), mw = load_f16(blk + LayoutQ5_1::kM);
    for (int i = 0; i < 32; ++i) sum += q5_code(blk + LayoutQ5_1::kQh, blk + LayoutQ5_1::kQs, i) * xq[i];
  } else {
    dw = load_f16(blk + LayoutQ8_0::kD);
    for (int i = 0; i < 32; ++i) sum += int(static_cast<int8_t>(blk[LayoutQ8_0::kQs + i])) * xq[i];
  }
  acc += (dw * dx) * float(sum);
  if constexpr (T == kQ4_1 || T == kQ5_1) summs += mw * sx;
}

// k-quants: acc += d_x * d_w * isum + (-d_x * dmin_w) * msum, where isum =
// sum_j scale_j * (codes . x over sub-block j) and msum = sum_j min_j * bsum_j
// (Q3_K and Q6_K have no min: their code offset is inside the codes).
template <int T>
void dot_kquant(const uint8_t* b, const int8_t* xq, float dx, const int16_t* bsums, float& acc) {
  int32_t isum = 0, msum = 0;
  float dw, dmin = 0.0f;
  if constexpr (T == kQ2_K) {
    dw = load_f16(b + LayoutQ2_K::kD), dmin = load_f16(b + LayoutQ2_K::kDmin);
    for (int j = 0; j < 16; ++j) {
      const int s = b[LayoutQ2_K::kScales + j];
      int32_t t = 0;
      for (int i = j * 16; i < j * 16 + 16; ++i) t += k_2bit(b + LayoutQ2_K::kQs, i) * xq[i];
      isum += (s & 0xF) * t;
      msum += (s >> 4) * bsums[j];
    }
  } else if constexpr (T == kQ3_K) {
    dw = load_f16(b + LayoutQ3_K::kD);
    for (int j = 0; j < 16; ++j) {
      int32_t t = 0;
      for (int i = j * 16; i < j * 16 + 16; ++i) t += q3k_code(b, i) * xq[i];
      isum += q3k_scale(b + LayoutQ3_K::kScales, j) * t;
    }
  } else if constexpr (T == kQ4_K || T == kQ5_K) {
    dw = load_f16(b + LayoutQ4_K::kD), dmin = load_f16(b + LayoutQ4_K::kDmin);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      k_scale_min(b + LayoutQ4_K::kScales, j, sc, m);
      int32_t t = 0;
      for (int i = j * 32; i < j * 32 + 32; ++i) {
        const int c = T == kQ4_K ? q4k_code(b + LayoutQ4_K::kQs, i)
                                 : q5k_code(b + LayoutQ5_K::kQh, b + LayoutQ5_K::kQs, i);
        t += c * xq[i];
      }
      isum += sc * t;
      msum += m * (bsums[2 * j] + bsums[2 * j + 1]);
    }
  } else {
    dw = load_f16(b + LayoutQ6_K::kD);
    for (int j = 0; j < 16; ++j) {
      int32_t t = 0;
      for (int i = j * 16; i < j * 16 + 16; ++i) t += q6k_code(b, i) * xq[i];
      isum += int(static_cast<int8_t>(b[LayoutQ6_K::kScales + j])) * t;
    }
  }
  acc += (dx * dw) * float(isum);
  if constexpr (T == kQ2_K || T == kQ4_K || T == kQ5_K) acc += (-dx * dmin) * float(msum);
}

template <int T>
void gguf_rows(const GgufWeight& w, const Acts& a, int64_t m0, int mr, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  const int bs = block_size(T), ts = type_size(T);
  const int64_t nb = w.k / bs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.blocks + n * w.row_bytes;
    for (int r = 0; r < mr; ++r) {
      const int64_t i = m0 + r;
      float acc = 0.0f, summs = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        if constexpr (is_kquant(T)) {
          dot_kquant<T>(row + b * ts, a.qs_row(i) + b * kSuper, a.d_row(i)[b], a.bsums_row(i) + b * 16, acc);
        } else {
          dot_legacy<T>(row + b * ts, a.qs_row(i) + b * kBlock, a.d_row(i)[b], a.s ? a.s_row(i)[b] : 0.0f, acc,
                        summs);
        }
      }
      y[i * ldy + n] = acc + summs;
    }
  }
}

// ---- Int and NF4: x in one plane (q, scale d) or two (256 q + q2, scale d / 256) ----

int32_t x_code(const Acts& a, int64_t row, int64_t j) {
  const int32_t q = a.qs_row(row)[j];
  return a.qs2 ? 256 * q + a.qs2_row(row)[j] : q;
}

float x_scale(const Acts& a, int64_t row, int64_t b) { return a.d_row(row)[b] * (a.qs2 ? 1.0f / 256.0f : 1.0f); }

// ---- Int: y = sum_c s_g(c) d_c (codes_c . x_c) - sum_g s_g z_g X_g --------------------

void int_rows(const IntArgs& args, const Acts& a, int64_t m0, int mr, int64_t n0, int64_t n1, float* y,
              int64_t ldy) {
  const IntWeight& w = *args.w;
  const int cb = int_chunk_bytes(w.bits);
  uint8_t codes[kIntChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.qweight + n * w.row_bytes;
    for (int r = 0; r < mr; ++r) {
      const int64_t i = m0 + r;
      float acc = 0.0f, zt = 0.0f;
      for (int64_t c = 0; c < w.chunks; ++c) {
        int_decode_chunk(row + c * cb, w.bits, codes);
        int32_t dot = 0;
        for (int j = 0; j < kIntChunk; ++j) dot += int(codes[j]) * x_code(a, i, c * kIntChunk + j);
        acc += w.scale(n, c / w.chunks_per_group) * (x_scale(a, i, c) * float(dot));
      }
      for (int64_t g = 0; g < w.groups; ++g) zt += w.scale(n, g) * w.zero(n, g) * args.xg[i * w.group_stride + g];
      y[i * ldy + n] = acc - zt;
    }
  }
}

// ---- NF4: y = sum_b absmax_b / 127 * d_b / 256 * (256 c8.q + c8.q2 + r8.q) ------------------

void nf4_rows(const nf4cpu::Weight& w, const Acts& a, int64_t m0, int mr, int64_t n0, int64_t n1, float* y,
              int64_t ldy) {
  const int sh = nf4cpu::nf4_log2(w.block_size);
  for (int64_t n = n0; n < n1; ++n) {
    for (int r = 0; r < mr; ++r) {
      const int64_t i = m0 + r;
      float acc = 0.0f;
      for (int64_t b = 0; b < w.k / kBlock; ++b) {
        const int64_t f0 = n * w.k + b * kBlock;
        int32_t dot = 0;  // 256 c8.q + c8.q2 + r8.q
        for (int j = 0; j < kBlock; ++j) {
          const uint32_t code = nf4_code(w.qweight, f0 + j);
          dot += nf4cpu::kNf4CodebookI8[code] * x_code(a, i, b * kBlock + j) +
                 nf4cpu::kNf4CodebookR8[code] * a.qs_row(i)[b * kBlock + j];
        }
        acc += (w.scales(f0 >> sh) * nf4cpu::kNf4I8Inv) * (x_scale(a, i, b) * float(dot));
      }
      y[i * ldy + n] = acc;
    }
  }
}

Table make_table() {
  Table t{};
  t.quantize = quantize;
  t.mr_gguf = t.mr_int = t.mr_nf4 = 4;
  t.gguf[kQ4_0] = gguf_rows<kQ4_0>;
  t.gguf[kQ4_1] = gguf_rows<kQ4_1>;
  t.gguf[kQ5_0] = gguf_rows<kQ5_0>;
  t.gguf[kQ5_1] = gguf_rows<kQ5_1>;
  t.gguf[kQ8_0] = gguf_rows<kQ8_0>;
  t.gguf[kQ2_K] = gguf_rows<kQ2_K>;
  t.gguf[kQ3_K] = gguf_rows<kQ3_K>;
  t.gguf[kQ4_K] = gguf_rows<kQ4_K>;
  t.gguf[kQ5_K] = gguf_rows<kQ5_K>;
  t.gguf[kQ6_K] = gguf_rows<kQ6_K>;
  for (int b : {2, 3, 4, 8}) t.int_rows[b] = int_rows;
  t.nf4 = nf4_rows;
  t.nf4_min_group = kBlock;
  return t;  // every layout natural
}

}  // namespace

const Table& table_scalar() {
  static const Table t = make_table();
  return t;
}

}  // namespace q8
}  // namespace pyquant
