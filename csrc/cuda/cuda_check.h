// CUDA errors become C++ exceptions, which pybind11 turns into Python
// RuntimeErrors: a bad launch never takes the process down.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define PQ_CUDA_CHECK(expr)                                                                  \
  do {                                                                                       \
    cudaError_t err__ = (expr);                                                              \
    if (err__ != cudaSuccess)                                                                \
      throw std::runtime_error(std::string("pyquant CUDA error: ") + cudaGetErrorString(err__) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__) + " (" #expr ")"); \
  } while (0)
