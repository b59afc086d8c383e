// Per-thread scratch buffers for the CPU kernels' working copies (repacked x,
// transposed outputs, decoded tiles), kept between calls: each is grown to
// the largest call so far instead of allocated per call, where several MiB
// would page-fault every time. Take a buffer in the calling thread before a
// parallel region (an allocation failure must reach Python as an exception,
// not terminate inside OpenMP) and share it out to the region's threads.
// Memory held this way is outside torch's allocator accounting.
#pragma once
#include <cstdint>
#include <memory>

namespace pyquant {

// One slot per buffer a single call needs at once.
// kXPanels: x repacked for a kernel (the outer-product panels, or int4_bf16.cpp's
// x in unit order with its working buffers). kYPartial: a y-shaped buffer
// of partial products (q8_driver.cpp's slices of K). kYOutput: the fp32 y of a
// product whose y is fp16 / bf16 (half_output.h). kXGathered: act_order's x
// with its columns in packed order (int_bindings.cpp).
enum class Scratch { kXPanels = 0, kYTransposed = 1, kTransposedTiles = 2, kYPartial = 3, kYOutput = 4,
                     kXGathered = 5 };
constexpr int kScratchSlots = 6;

// At least `floats` floats, 64-byte aligned, contents unspecified; valid until
// the next call with the same slot on this thread.
float* thread_scratch(int64_t floats, Scratch slot);

// A per-call buffer of at least `floats` floats for the small products of
// decode, where a heap allocation per call is a measurable share: up to
// kCallScratchFloats (1 MiB) the kept slot, larger ones a buffer of its own,
// freed with this object, so a prefill's or a training batch's is not held on
// to.
constexpr int64_t kCallScratchFloats = int64_t(1) << 18;
class CallScratch {
 public:
  CallScratch(int64_t floats, Scratch slot) {
    if (floats <= kCallScratchFloats) {
      p_ = thread_scratch(floats, slot);
    } else {
      own_.reset(new float[size_t(floats)]);
      p_ = own_.get();
    }
  }
  float* get() const { return p_; }

 private:
  std::unique_ptr<float[]> own_;
  float* p_ = nullptr;
};

}  // namespace pyquant
