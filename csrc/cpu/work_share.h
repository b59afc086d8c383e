// Row blocks shared out among the threads of one parallel region: each
// thread streams its own contiguous range front to back (one sequential
// weight stream per thread, which the hardware prefetcher follows) and, when
// done, takes blocks from the back of the others' ranges, so that on a shared
// machine a descheduled thread delays only the block it is on.
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace pyquant {

// A thread's range of blocks, [head, tail) in one atomic word so that its
// owner (taking from the front) and a thief (from the back) can never both
// get the same block.
struct alignas(64) Share {
  std::atomic<uint64_t> ht{0};
  void init(int64_t b0, int64_t b1) { ht.store(uint64_t(b0) << 32 | uint64_t(b1), std::memory_order_relaxed); }
  template <bool kFront>
  int64_t take() {
    uint64_t v = ht.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t h = v >> 32, t = v & 0xFFFFFFFFu;
      if (h >= t) return -1;
      const uint64_t next = kFront ? (h + 1) << 32 | t : h << 32 | (t - 1);
      if (ht.compare_exchange_weak(v, next, std::memory_order_relaxed)) return int64_t(kFront ? h : t - 1);
    }
  }
};

// Before the parallel region: [0, blocks) split into nt contiguous ranges.
// (Set up here, not by each thread inside the region behind a barrier: on a
// busy machine a barrier makes every thread wait until the last one is
// scheduled, a whole time slice, before any work starts.)
inline void init_shares(Share* shares, int nt, int64_t blocks) {
  for (int t = 0; t < nt; ++t) shares[t].init(blocks * t / nt, blocks * (t + 1) / nt);
}

// Inside `#pragma omp parallel`, shares[0 .. nt) from init_shares, thread t
// of however many the region got: runs fn(block) for blocks of its own range
// front to back, then takes the others' from the back. Every block of
// [0, blocks) runs exactly once, whichever threads turn up and when.
template <typename Fn>
void run_shared(Share* shares, int nt, int t, Fn&& fn) {
  for (int v = 0; v < nt; ++v) {
    Share& s = shares[(t + v) % nt];
    if (v == 0)
      for (int64_t b; (b = s.template take<true>()) >= 0;) fn(b);
    else
      for (int64_t b; (b = s.template take<false>()) >= 0;) fn(b);
  }
}

// fn(block) for every block of [0, blocks) on nthreads threads (at least
// one), shared out as above: the shares set up before the parallel region.
template <typename Fn>
void parallel_shared(int nthreads, int64_t blocks, Fn&& fn) {
  const int nt = std::max(nthreads, 1);
  if (nt == 1) {  // nothing to share: no region, no atomic per block (~0.5 us at 96 blocks)
    for (int64_t b = 0; b < blocks; ++b) fn(b);
    return;
  }
  std::unique_ptr<Share[]> shares(new Share[size_t(nt)]);
  init_shares(shares.get(), nt, blocks);
#pragma omp parallel num_threads(nt)
  run_shared(shares.get(), nt, omp_get_thread_num(), fn);
}

// The L1D the small-M kernels plan their passes and slices of x around
// (48 KiB on Zen 4/5 and Sapphire Rapids' P-cores).
constexpr int64_t kL1Bytes = 48 * 1024;

// Rows of x (row_bytes each, as the kernel reads them) a small-M kernel takes
// per pass: as many as stay within kL1Bytes, 1 to max_rows. NF4's fused kernel
// at K = 4096 ran M = 4 in 1.12 ms with four fp32 rows a pass (64 KiB), 0.95
// with passes of three (1 thread); at K = 576 four rows a pass were the faster.
inline int64_t rows_within_l1_bytes(int64_t row_bytes, int64_t max_rows) {
  return std::clamp<int64_t>(kL1Bytes / std::max<int64_t>(row_bytes, 1), 1, max_rows);
}
inline int64_t rows_within_l1(int64_t k, int64_t max_rows) { return rows_within_l1_bytes(4 * k, max_rows); }

// Long rows on AVX-512 (NF4's whole_block_rows512, the Int4 table kernel): a
// pass's x goes a slice of K at a time once it is longer than kSliceFloats
// fp32 values (32 KiB), in passes of as many rows as fit at K = kSlicePassK;
// kernels reading long rows in slices or K blocks (those two and the
// AVX512-BF16 Int4 kernel) prefetch the same place kSliceAheadRows rows on,
// read that many rows' slices later (NF4 at K = 11008: 4 rows on ran
// 0.91-0.94x).
constexpr int64_t kSliceFloats = 8192, kSlicePassK = 4096, kSliceAheadRows = 8;

}  // namespace pyquant
