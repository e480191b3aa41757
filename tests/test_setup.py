"""The set-up installs CPU-only frameworks: a change that starts pulling CUDA wheels fails here."""

from __future__ import annotations

import importlib.metadata

import pytest

GPU_PACKAGES = ("nvidia-", "triton", "cuda-")


def test_no_cuda_packages_are_installed():
    names = sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions() if d.metadata["Name"])
    assert [n for n in names if n.startswith(GPU_PACKAGES)] == []


def test_torch_is_the_cpu_build():
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed in this environment")
    assert version.endswith("+cpu"), version
