"""Plain-PyTorch implementations: the test oracle and the CPU fallback."""
