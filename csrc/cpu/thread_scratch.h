// Per-thread scratch buffers for the CPU kernels' working copies (repacked x,
// transposed outputs, decoded tiles), kept between calls: each is grown to
// the largest call so far instead of allocated per call, where several MiB
// would page-fault every time. Take a buffer in the calling thread before a
// parallel region (an allocation failure must reach Python as an exception,
// not terminate inside OpenMP) and share it out to the region's threads.
// Memory held this way is outside torch's allocator accounting.
#pragma once
#include <cstdint>

namespace pyquant {

// One slot per buffer a single call needs at once.
// kXPanels: x repacked for a kernel (the outer-product panels, or int4_bf16.cpp's
// x in unit order with its working buffers). kYPartial: a y-shaped buffer
// of partial products (q8_driver.cpp's slices of K). kYOutput: the fp32 y of a
// product whose y is fp16 / bf16 (half_output.h).
enum class Scratch { kXPanels = 0, kYTransposed = 1, kTransposedTiles = 2, kYPartial = 3, kYOutput = 4 };
constexpr int kScratchSlots = 5;

// At least `floats` floats, 64-byte aligned, contents unspecified; valid until
// the next call with the same slot on this thread.
float* thread_scratch(int64_t floats, Scratch slot);

}  // namespace pyquant
