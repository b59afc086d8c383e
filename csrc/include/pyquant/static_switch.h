// Compile-time switches: a launcher turns a run-time code that crossed the
// Python/C++ boundary (a DType, an Int bit width) into a type or a constant
// and instantiates its kernel template for it, written once instead of as a
// case ladder per launcher.
//
//   PQ_DTYPE_SWITCH(out_dtype, scalar_t, "int_dequant_cuda", [&] {
//     int_dequant_kernel<scalar_t><<<grid, threads, 0, stream>>>(...);
//   });
//   PQ_BITS_SWITCH(w.bits, kBits, "int_gemm_avx2", [&] { gemm<kBits>(...); });
//
// The macro opens a scope per accepted value, declares the name given as its
// second argument there (`using scalar_t = ...;` or `constexpr int kBits =
// ...;`) and calls the lambda written in that scope, so the lambda sees the
// name; the switch's value is the lambda's. No CUDA runtime calls, so host
// C++ and the host side of .cu files use the same macros.
//
// A code outside the list throws std::invalid_argument naming the launcher,
// the argument and the code. Python validated the code, so this only fires on
// a bug, and then it must not fall through to some default instantiation.
// Kernels run inside OpenMP regions must not throw: switch before the region.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "pyquant/common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace pyquant {

// Storage-only 16-bit float types for host-only C++, which has no half types
// of its own: the CPU kernels convert the bits with half_bits_to_float /
// bf16_bits_to_float (common.h). CUDA code gets CUDA's types instead, whose
// device arithmetic and conversions the kernels use.
struct f16_storage {
  uint16_t bits;
};
struct bf16_storage {
  uint16_t bits;
};

[[noreturn]] inline void throw_unknown_code(const char* where, const char* arg, int code, const char* accepted) {
  throw std::invalid_argument(std::string(where) + ": " + arg + " = " + std::to_string(code) + " is not one of " +
                              accepted);
}

}  // namespace pyquant

// The C++ type of each DType in this translation unit.
#if defined(__CUDACC__)
#define PQ_F16_SCALAR __half
#define PQ_BF16_SCALAR __nv_bfloat16
#else
#define PQ_F16_SCALAR ::pyquant::f16_storage
#define PQ_BF16_SCALAR ::pyquant::bf16_storage
#endif

// DType code -> `using TYPE_NAME = float | f16 | bf16;` seen by the lambda.
#define PQ_DTYPE_SWITCH(CODE, TYPE_NAME, WHERE, ...)                                                           \
  [&] {                                                                                                        \
    switch (CODE) {                                                                                            \
      case ::pyquant::kF32: {                                                                                  \
        using TYPE_NAME = float;                                                                               \
        return __VA_ARGS__();                                                                                  \
      }                                                                                                        \
      case ::pyquant::kF16: {                                                                                  \
        using TYPE_NAME = PQ_F16_SCALAR;                                                                       \
        return __VA_ARGS__();                                                                                  \
      }                                                                                                        \
      case ::pyquant::kBF16: {                                                                                 \
        using TYPE_NAME = PQ_BF16_SCALAR;                                                                      \
        return __VA_ARGS__();                                                                                  \
      }                                                                                                        \
      default:                                                                                                 \
        ::pyquant::throw_unknown_code(WHERE, #CODE, (CODE), "0 (fp32), 1 (fp16), 2 (bf16)");                   \
    }                                                                                                          \
  }()

// Int format bit width (pyquant/formats/int_format.py) -> `constexpr int
// CONST_NAME;` seen by the lambda.
#define PQ_BITS_SWITCH(BITS, CONST_NAME, WHERE, ...)                                                           \
  [&] {                                                                                                        \
    switch (BITS) {                                                                                            \
      case 2: {                                                                                                \
        [[maybe_unused]] static constexpr int CONST_NAME = 2;                                                  \
        return __VA_ARGS__();                                                                                  \
      }                                                                                                        \
      case 3: {                                                                                                \
        [[maybe_unused]] static constexpr int CONST_NAME = 3;                                                  \
        return __VA_ARGS__();                                                                                  \
      }                                                                                                        \
      case 4: {                                                                                                \
        [[maybe_unused]] static constexpr int CONST_NAME = 4;                                                  \
        return __VA_ARGS__();                                                                                  \
      }                                                                                                        \
      case 8: {                                                                                                \
        [[maybe_unused]] static constexpr int CONST_NAME = 8;                                                  \
        return __VA_ARGS__();                                                                                  \
      }                                                                                                        \
      default:                                                                                                 \
        ::pyquant::throw_unknown_code(WHERE, #BITS, (BITS), "2, 3, 4, 8");                                     \
    }                                                                                                          \
  }()
