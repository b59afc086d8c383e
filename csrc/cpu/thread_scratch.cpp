#include "thread_scratch.h"

#include <cstddef>
#include <vector>

namespace pyquant {

float* thread_scratch(int64_t floats, Scratch slot) {
  thread_local std::vector<float> buffers[kScratchSlots];
  std::vector<float>& s = buffers[static_cast<int>(slot)];
  // 16 spare floats: the tiles load the buffers aligned to 64 bytes.
  if (int64_t(s.size()) < floats + 16) {
    s = std::vector<float>();  // released before growing: the peak is the new size, not both
    s.resize(size_t(floats + 16));
  }
  const auto addr = reinterpret_cast<uintptr_t>(s.data());
  return s.data() + (64 - addr % 64) % 64 / sizeof(float);
}

}  // namespace pyquant
