"""Shared test fixtures: paths to the shared reference data (skipping cleanly when absent) and GPU gating."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when this checkout has no shared data."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: GPU tests cannot run either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """Nothing may be fetched from a model hub: any accidental download fails fast instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def gloo_on_cpu(monkeypatch):
    """Multi-process tests of the gloo/CPU path hide any GPU: on a CUDA machine the engine would pick NCCL, which
    needs one GPU per process. Processes started afterwards (mp.spawn, subprocess) inherit the setting."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tok_dir():
    """The real SmolLM2 tokenizer folder (shared data), the default model's; tests of the data path use it."""
    return shared_path("tokenizers", "smollm2")


@pytest.fixture
def private_data_cache(tmp_path, monkeypatch):
    """A data cache of the test's own: no entries shared with other tests or runs on this machine."""
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def recompute_recipes(monkeypatch):
    """A list that grows by one each time fastchat_ft.kernels.swiglu.recomputed_for_backward turns a saved tensor
    into a recompute recipe (instead of keeping it)."""
    import importlib

    swiglu_module = importlib.import_module("fastchat_ft.kernels.swiglu")  # the package attribute is the function
    made = []

    class CountedRecipe(swiglu_module._Recompute):
        def __init__(self, *args):
            made.append(1)
            super().__init__(*args)

    monkeypatch.setattr(swiglu_module, "_Recompute", CountedRecipe)
    return made
