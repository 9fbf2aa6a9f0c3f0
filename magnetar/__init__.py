"""Magnetar: a local coding agent for DeepSeek V4 Flash.

The code lives in the top-level folders agent/, runtime/, tools/, kernels/ and
prompts/, installed as magnetar.agent, magnetar.runtime and so on.
"""

import os

__version__ = "0.1.0"

# After every product numpy's OpenBLAS keeps its worker threads spinning for ~0.1 s
# (OPENBLAS_THREAD_TIMEOUT's default, 2^28 cycles) on the cores that our expert kernels
# and MLX need next: small q2's 512-token prefill took 3.4 s against 2.8 s with the
# shortest spin (issue 16). OpenBLAS reads the setting once, when numpy loads it, so it is
# set for that moment only: a user's own value wins, and child processes (bench peers,
# shell tools) keep their defaults. A program that loaded numpy before magnetar keeps its
# spin.
if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"  # 2^4 cycles, OpenBLAS's floor
    try:
        import numpy  # noqa: F401  (loads OpenBLAS with the setting)
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]
