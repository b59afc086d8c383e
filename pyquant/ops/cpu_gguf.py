"""CPU C++ kernels for the gguf formats: thin wrappers over pyquant._C."""
