"""The accelerator the `gpu`-marked tests run on.

They target CUDA (benchmarks/gpu_check.sh runs them on a GPU). `PEBR_TEST_DEVICE=cpu`
runs the same tests on the CPU, which is how the CPU dry run of the GPU check keeps
them from rotting between sessions that have a GPU; without it and without CUDA they
are skipped (tests/conftest.py says why).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def device() -> str:
    """ "cuda" (the default) or the PEBR_TEST_DEVICE override, e.g. "cpu"."""
    return os.environ.get("PEBR_TEST_DEVICE", "cuda")
