"""``train.blas_workspace_mib``: cuBLAS's workspace is made small under gradient checkpointing (auto), sized as asked
when given, left to PyTorch otherwise, and a size from the user's environment wins over auto. Nothing is set on a
machine without CUDA. The setting is what the process's first cuBLAS call reads (``CUBLAS_WORKSPACE_CONFIG``, or
PyTorch's setter where it has one)."""

import pytest
import torch

from tunesmith.config import RunConfig
from tunesmith.train import kernels


def _train(**values):
    return RunConfig.model_validate({"train": values}).train


@pytest.fixture
def recorded(monkeypatch):
    """Where the size goes: the environment variable (PyTorch ≤ 2.11), or the setter (later); both captured."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    sizes = []
    monkeypatch.setattr(torch._C, "_cuda_setCublasWorkspaceSize", sizes.append, raising=False)
    return sizes


def test_auto_is_lean_under_checkpointing_only(recorded, monkeypatch):
    assert kernels.set_blas_workspace(_train(), device_available=True) == {
        "mib": None, "reason": "auto without gradient checkpointing: PyTorch's default"}
    assert recorded == []
    lean = kernels.set_blas_workspace(_train(gradient_checkpointing=True), device_available=True)
    assert lean == {"mib": 4, "reason": "auto under gradient checkpointing"}
    assert recorded == [4 * 2 ** 20]


def test_an_explicit_size_and_the_environment(recorded, monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_setCublasWorkspaceSize", None)  # PyTorch without the setter
    assert kernels.set_blas_workspace(_train(blas_workspace_mib=16), device_available=True)["mib"] == 16
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16384:1"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the user's own: auto leaves it
    kept = kernels.set_blas_workspace(_train(gradient_checkpointing=True), device_available=True)
    assert kept == {"mib": None, "reason": "CUBLAS_WORKSPACE_CONFIG=:4096:8 from the environment"}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_no_cuda_sets_nothing(recorded):
    assert kernels.set_blas_workspace(_train(blas_workspace_mib=8), device_available=False) == {
        "mib": None, "reason": "no CUDA device"}
    assert recorded == []


def test_a_negative_size_is_refused():
    with pytest.raises(ValueError, match="blas_workspace_mib must be auto or a size in MiB"):
        _train(blas_workspace_mib=-1)
