"""CPU C++ kernels for the nf4 formats: thin wrappers over pyquant._C."""
