// The q8 kernels' driver (baseline code): picks the kernel table of the
// SIMD level in effect, quantizes x once, and shares blocks of weight rows
// among the threads; each block runs every row of x in passes of up to
// the table's mr_* rows, then its bias and low-rank epilogue while the block of
// y is in cache. The kernels themselves live in q8_scalar.cpp and q8_impl.inc.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "q8_kernels.h"
#include "thread_scratch.h"
#include "work_share.h"

namespace pyquant {
namespace q8 {

uint16_t float_to_half_rne(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));  // inf / nan
  if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (ax < 0x33000000u) return uint16_t(sign);  // below half of the smallest subnormal (2^-25)
    const uint32_t e = ax >> 23, mant = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // value = mant * 2^(e - 150); a half subnormal unit is 2^-24
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = ((ax - 0x38000000u) >> 13);  // rebias the exponent (127 -> 15), keep 10 mantissa bits
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

namespace {

constexpr int64_t kRows = 16;  // weight rows per block handed to a thread

const Table& table_for(Simd level) {
#if PQ_X86
  switch (level) {
    case Simd::kAvx512: return table_avx512();
    case Simd::kAvxVnni: return table_avxvnni();
    case Simd::kAvx2: return table_avx2();
    default: break;
  }
#endif
  (void)level;
  return table_scalar();
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// The arrays of an Acts in one 64-byte aligned allocation.
class ActBuffer {
 public:
  ActBuffer(ActKind kind, Layout layout, int64_t m, int64_t k, int64_t kp) {
    a.m = m, a.k = k, a.kp = kp, a.kind = kind, a.layout = layout;
    const bool k256 = kind == ActKind::kQ8_K, two = kind == ActKind::kQ8x2_32;
    const bool lanes = kind == ActKind::kQ8_32 || two;
    a.nb = kp / (k256 ? kSuper : kBlock);
    constexpr int kArrays = 8;
    size_t off[kArrays], total = 0;
    const size_t sizes[kArrays] = {
        size_t(m * kp),                            // qs
        size_t(m * a.nb) * 4,                      // d
        k256 ? 0 : size_t(m * a.nb) * 4,           // s
        k256 ? 0 : size_t(m * a.nb) * 4,           // isum
        k256 ? size_t(m * kp / 16) * 2 : 0,        // bsums
        lanes ? size_t(m * kp / 4) * 4 : 0,        // dl
        two ? size_t(m * kp) : 0,                  // qs2
        two ? size_t(m * a.nb) * 4 : 0,            // isum1
    };
    for (int i = 0; i < kArrays; ++i) {
      off[i] = total;
      total += (sizes[i] + 63) / 64 * 64;
    }
    mem_.reset(std::aligned_alloc(64, total ? total : 64));
    if (!mem_) throw std::bad_alloc();  // pybind11 turns it into MemoryError
    char* base = static_cast<char*>(mem_.get());
    auto at = [&](int i) -> void* { return sizes[i] ? base + off[i] : nullptr; };
    a.qs = static_cast<int8_t*>(at(0));
    a.d = static_cast<float*>(at(1));
    a.s = static_cast<float*>(at(2));
    a.isum = static_cast<int32_t*>(at(3));
    a.bsums = static_cast<int16_t*>(at(4));
    a.dl = static_cast<float*>(at(5));
    a.qs2 = static_cast<int8_t*>(at(6));
    a.isum1 = static_cast<int32_t*>(at(7));
  }
  Acts a;

 private:
  std::unique_ptr<void, FreeDeleter> mem_;
};

// Threads worth waking: each should get ~2^17 multiply-adds at least (a
// parallel region costs microseconds idle, much more on a busy machine).
int threads_for(int64_t m, int64_t n, int64_t k, int nthreads, int64_t blocks, int mr) {
  const int64_t passes = (m + mr - 1) / mr;
  const int64_t work = n * k * passes;
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), work >> 17, blocks})));
}

// Runs rows(m0, mr, n0, n1) over every block of kRows weight rows and every
// pass of up to max_mr rows of x, then epi(n0, n1) for the block.
template <typename Rows, typename Epi>
void run(int64_t m, int64_t n, int64_t k, int nthreads, int max_mr, Rows&& rows, Epi&& epi) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  parallel_shared(threads_for(m, n, k, nthreads, blocks, max_mr), blocks, [&](int64_t b) {
    const int64_t n0 = b * kRows, n1 = std::min(n, n0 + kRows);
    for (int64_t m0 = 0; m0 < m; m0 += max_mr) rows(m0, int(std::min<int64_t>(max_mr, m - m0)), n0, n1);
    epi(n0, n1);
  });
}

// Rows of x per pass for the Int kernels: as many as keep their two planes
// and lane scales (3 bytes a value) within 48 KiB of L1, 1 to max_mr. Every
// row of a pass is read once per weight row: at K = 11008 (33 KiB a row) four
// rows a pass went to L2 for every weight row and took M = 2-8 at 2.0-2.2x the
// time of as many bytes in rows of 4096. (NF4's dearer decode is worth
// sharing: at K = 11008, M = 2 in passes of one row ran 0.91x, at the avx512
// level; its passes stay as they were.)
int planes_pass_rows(int64_t kp, int max_mr) { return int(rows_within_l1_bytes(3 * kp, max_mr)); }
// Where only one row fits and M > 1, the rows go in passes of max_mr a slice
// of K (16 KiB of planes) at a time instead: 1.15-1.21x passes of one row at
// K = 11008, M = 2-8 (Zen 5). Where two fit (K = 8192) their whole rows beat
// slices of 2048 for four (0.96-0.98x sliced).
constexpr int64_t kIntSlicePlaneBytes = 16 * 1024;

// Bytes of quantized x (all the rows of a pass, about 9 / 8 of a byte a
// value) above which the pass goes in slices of K, and the bytes a slice
// takes. At K = 4096, 8 rows a pass (36 KiB) in slices of 2048 ran M = 8-32
// at 0.92-0.97x whole rows; at K = 11008 slices of 16 KiB ran 1.0-1.3x
// slices of 32 KiB.
constexpr int64_t kGgufPassBytes = kL1Bytes, kGgufSliceBytes = 16 * 1024;

// Columns [k0, kp) of a's rows: the same row strides (kp, nb), the arrays
// from column k0 on (k0 a multiple of 256: whole blocks of every kind, and
// whole units of every x layout).
Acts slice_of(const Acts& a, int64_t k0) {
  Acts s = a;
  const int64_t blk = a.kind == ActKind::kQ8_K ? kSuper : kBlock;
  s.qs = a.qs + k0;
  if (a.qs2) s.qs2 = a.qs2 + k0;
  s.d = a.d + k0 / blk;
  if (a.s) s.s = a.s + k0 / blk;
  if (a.isum) s.isum = a.isum + k0 / blk;
  if (a.isum1) s.isum1 = a.isum1 + k0 / blk;
  if (a.corr) s.corr = a.corr + k0 / blk;
  if (a.bsums) s.bsums = a.bsums + k0 / 16;
  if (a.dl) s.dl = a.dl + k0 / 4;
  return s;
}

// A rows(m0, mr, n0, n1) function for run() that covers K in slices of
// `slice` values: slice_rows(m0, mr, n0, n1, k0, k1, out) writes slice [k0,
// k1)'s products into out (y, ldy columns) for the first slice and into
// `part` (as y) for the others, whose block is then added to y.
template <typename SliceRows>
auto in_k_slices(int64_t k, int64_t slice, float* y, float* part, int64_t ldy, SliceRows&& slice_rows) {
  return [=, &slice_rows](int64_t m0, int mr, int64_t n0, int64_t n1) {
    for (int64_t k0 = 0; k0 < k; k0 += slice) {
      slice_rows(m0, mr, n0, n1, k0, std::min(k, k0 + slice), k0 == 0 ? y : part);
      if (k0 == 0) continue;
      for (int64_t i = m0; i < m0 + mr; ++i)
        for (int64_t j = n0; j < n1; ++j) y[i * ldy + j] += part[i * ldy + j];
    }
  };
}

// Columns [k0, k1) of an Int weight with groups of group_size (k0 a multiple
// of it and of 256): the rows' codes, scales and zeros from there, the same
// row strides.
IntWeight int_slice(const IntWeight& w, int64_t k0, int64_t k1) {
  IntWeight s = w;
  const int64_t g0 = k0 / w.group_size, dtype_bytes = w.scale_dtype == kF32 ? 4 : 2;
  s.qweight = w.qweight + k0 / kIntChunk * int_chunk_bytes(w.bits);
  s.scales = static_cast<const char*>(w.scales) + g0 * dtype_bytes;
  if (w.zeros) s.zeros = static_cast<const char*>(w.zeros) + g0 * dtype_bytes;
  s.k = k1 - k0;
  s.chunks = (s.k + kIntChunk - 1) / kIntChunk;
  s.groups = (s.k + w.group_size - 1) / w.group_size;
  return s;
}

void add_bias(float* y, int64_t ldy, int64_t m, int64_t n0, int64_t n1, const float* bias) {
  if (!bias) return;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = n0; j < n1; ++j) y[i * ldy + j] += bias[j];
}

}  // namespace

void gguf_qmatmul(int type, const void* x, int x_dtype, int64_t m, const uint8_t* blocks, int64_t n, int64_t k,
                  const float* bias, float* y, int nthreads) {
  using namespace gguf;
  if (!valid_type(type)) throw std::invalid_argument("unknown GGUF block type " + std::to_string(type));
  if (m <= 0 || n <= 0) return;
  const Table& t = table_for(simd_level());
  const ActKind kind = is_kquant(type) ? ActKind::kQ8_K
                       : (type == kQ4_1 || type == kQ5_1) ? ActKind::kQ8_1
                                                          : ActKind::kQ8_0;
  const Layout layout = (m == 1 ? t.gguf_layout_one_row : t.gguf_layout)[type];
  ActBuffer buf(kind, layout, m, k, k);
  t.quantize(x, x_dtype, buf.a);
  const GgufWeight w{type, blocks, n, k, k / block_size(type) * type_size(type)};
  const GgufRowsFn fn = t.gguf[type];
  auto epi = [&](int64_t n0, int64_t n1) { add_bias(y, n, m, n0, n1, bias); };
  const int mr = int(std::min<int64_t>(m, t.mr_gguf));
  const int64_t slice = std::max<int64_t>(kSuper, kGgufSliceBytes / mr / kSuper * kSuper);
  const bool q4_0_rows16 = type == kQ4_0 && t.q4_0_rows16_from > 0 && mr >= t.q4_0_rows16_from;
  // (BlockPairs16 x pairs 256-blocks: a slice starting at an odd one would split a pair)
  if (!t.gguf_k_slices || mr * k * 9 / 8 <= kGgufPassBytes || k <= slice || k % kSuper != 0 || q4_0_rows16 ||
      layout == Layout::kBlockPairs16) {
    run(m, n, k, nthreads, t.mr_gguf,
        [&](int64_t m0, int rows, int64_t n0, int64_t n1) { fn(w, buf.a, m0, rows, n0, n1, y, n); }, epi);
    return;
  }
  // Long rows: each block of weight rows a slice of K at a time, so that a
  // pass's rows of x stay in L1 while the block's rows stream past. The first
  // slice writes y; the others write their partial products into a y-shaped
  // buffer, added to y. Whole rows at K = 11008 (12 KiB of x a row, 8 rows a
  // pass at the avx512 level) took M = 4-32 at 1.24-2.03x the time of as many
  // bytes in rows of 4096 (Q4_K, Q6_K, Q8_0; Zen 5). Slices are whole
  // 256-value units, so every kernel and x layout sees whole blocks and units.
  const int64_t bs = block_size(type), ts = type_size(type);
  auto slice_rows = [&](int64_t m0, int rows, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out) {
    const GgufWeight ws{type, blocks + k0 / bs * ts, n, k1 - k0, w.row_bytes};
    fn(ws, slice_of(buf.a, k0), m0, rows, n0, n1, out, n);
  };
  run(m, n, k, nthreads, t.mr_gguf, in_k_slices(k, slice, y, thread_scratch(m * n, Scratch::kYPartial), n, slice_rows),
      epi);
}

int int_act_span(int64_t group_size) {
  return group_size == 64 || group_size == 128 || group_size == 256 ? int(group_size / kBlock) : 1;
}

void int_qmatmul(const void* x, int x_dtype, int64_t m, const IntWeight& w, const float* bias,
                 const LoraEpilogue& lora, float* y, int nthreads) {
  if (m <= 0 || w.n <= 0) return;
  const Table& t = table_for(simd_level());
  const int64_t kp = w.chunks * kIntChunk;
  ActBuffer buf(ActKind::kQ8x2_32, t.int_layout[w.bits], m, w.k, kp);
  Acts& a = buf.a;
  a.span = int_act_span(w.group_size);
  t.quantize(x, x_dtype, a);
  // X[g] = sum over the group's 32-blocks of d * sum(q): the zero-point term.
  std::unique_ptr<float[]> xg(new float[size_t(m * w.groups)]);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t c0 = g * w.chunks_per_group, c1 = std::min(w.chunks, c0 + w.chunks_per_group);
      float s = 0.0f;
      for (int64_t c = c0; c < c1; ++c) s += a.s[i * a.nb + c];
      xg[size_t(i * w.groups + g)] = s;
    }
  }
  const IntArgs args{&w, xg.get()};
  const IntRowsFn fn = t.int_rows[w.bits];
  auto epi = [&](int64_t n0, int64_t n1) {
    add_bias(y, w.n, m, n0, n1, bias);
    lora.apply(y, w.n, 0, m, n0, n1);
  };
  const int pass_rows = planes_pass_rows(kp, t.mr_int), mr = int(std::min<int64_t>(m, t.mr_int));
  // Slices start on a group and on a 256-value unit: with a power-of-two
  // group size (Int's sizes) a multiple of the larger is both.
  const bool pow2_groups = w.group_size > 0 && (w.group_size & (w.group_size - 1)) == 0;
  const int64_t step = std::max<int64_t>(kSuper, w.group_size);
  const int64_t slice = std::max(step, kIntSlicePlaneBytes / 2 / mr / step * step);
  if (!pow2_groups || pass_rows > 1 || m == 1 || w.k <= slice) {
    run(m, w.n, w.k, nthreads, pass_rows,
        [&](int64_t m0, int rows, int64_t n0, int64_t n1) { fn(args, a, m0, rows, n0, n1, y, w.n); }, epi);
    return;
  }
  auto slice_rows = [&](int64_t m0, int rows, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out) {
    const IntWeight ws = int_slice(w, k0, k1);
    const IntArgs sargs{&ws, xg.get() + k0 / w.group_size};
    fn(sargs, slice_of(a, k0), m0, rows, n0, n1, out, w.n);
  };
  run(m, w.n, w.k, nthreads, t.mr_int,
      in_k_slices(w.k, slice, y, thread_scratch(m * w.n, Scratch::kYPartial), w.n, slice_rows), epi);
}

bool nf4_supported(int64_t k) { return k > 0 && k % kBlock == 0; }

void nf4_qmatmul(const void* x, int x_dtype, int64_t m, const nf4cpu::Weight& w, const float* bias,
                 const LoraEpilogue& lora, float* y, int nthreads) {
  if (m <= 0 || w.n <= 0) return;
  if (!nf4_supported(w.k)) throw std::invalid_argument("NF4 q8 kernel needs K % 32 == 0, got " + std::to_string(w.k));
  const Table* t = &table_for(simd_level());
  if (w.k % t->nf4_min_group != 0) t = &table_scalar();  // (unreachable for layer shapes: K % 64 == 0)
  ActBuffer buf(ActKind::kQ8x2_32, t->nf4_layout, m, w.k, w.k);
  Acts& a = buf.a;
  t->quantize(x, x_dtype, a);
  // The 512-bit kernel feeds the codebook planes as c8 + 127, r8 + 128 (u8):
  // its dots start at -(127 sum(256 q + q2) + 128 sum(q)) per block.
  std::unique_ptr<int32_t[]> corr(new int32_t[size_t(m * a.nb)]);
  for (int64_t i = 0; i < m * a.nb; ++i) corr[size_t(i)] = -(127 * a.isum[i] + 128 * a.isum1[i]);
  a.corr = corr.get();
  const Nf4RowsFn fn = t->nf4;
  run(m, w.n, w.k, nthreads, t->mr_nf4, [&](int64_t m0, int mr, int64_t n0, int64_t n1) { fn(w, buf.a, m0, mr, n0, n1, y, w.n); },
      [&](int64_t n0, int64_t n1) {
        add_bias(y, w.n, m, n0, n1, bias);
        lora.apply(y, w.n, 0, m, n0, n1);
      });
}

void quantize_activations(ActKind kind, const void* x, int x_dtype, int64_t m, int64_t k, int8_t* qs, float* d,
                          float* s, int32_t* isum, int16_t* bsums, int8_t* qs2, int32_t* isum1, int span) {
  if (m <= 0) return;
  const Table& t = table_for(simd_level());
  const int64_t blk = kind == ActKind::kQ8_K ? kSuper : kBlock;
  const int64_t kp = (k + blk - 1) / blk * blk;
  ActBuffer buf(kind, Layout::kNatural, m, k, kp);
  buf.a.span = span;
  t.quantize(x, x_dtype, buf.a);
  const Acts& a = buf.a;
  std::memcpy(qs, a.qs, size_t(m * kp));
  std::memcpy(d, a.d, size_t(m * a.nb) * 4);
  if (s && a.s) std::memcpy(s, a.s, size_t(m * a.nb) * 4);
  if (isum && a.isum) std::memcpy(isum, a.isum, size_t(m * a.nb) * 4);
  if (bsums && a.bsums) std::memcpy(bsums, a.bsums, size_t(m * kp / 16) * 2);
  if (qs2 && a.qs2) std::memcpy(qs2, a.qs2, size_t(m * kp));
  if (isum1 && a.isum1) std::memcpy(isum1, a.isum1, size_t(m * a.nb) * 4);
}

}  // namespace q8
}  // namespace pyquant
