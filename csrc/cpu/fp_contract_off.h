// Included first by the CPU kernels that must reproduce a pure-torch spec's
// fp32 arithmetic bit for bit (kquant_quantize.cpp, hqq_solver.cpp,
// hqq_integer_zero.cpp): every product and sum rounded on its own. A
// contracted a*b+c (one FMA) rounds once and flips ties in the scale and
// zero-point searches. GCC contracts by default wherever FMA is enabled (the
// AVX2 target functions, aarch64), even across statements and in vector
// intrinsics it lowers to plain arithmetic; clang contracts within an
// expression. The pragmas below turn that off for every function defined
// after this include; explicit FMA intrinsics stay FMAs.
#pragma once

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
