"""Shared bench helpers (the package's hardware module): every bench prints the CPU."""

from openmoe.utils.hardware import cpu_info, describe_machine, matmul_peak, retain_freed_memory, timeit  # noqa: F401
