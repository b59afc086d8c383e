"""CPU C++ kernels for the int formats: thin wrappers over pyquant._C."""
