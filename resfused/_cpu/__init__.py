"""CPU fast paths that ``auto`` picks for CPU tensors (resfused._backend's module docstring): torch's own oneDNN ops."""
