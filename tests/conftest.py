"""Shared test set-up: offline Hugging Face settings and tiny checkpoint families built on demand.

Everything runs offline: the hub and datasets are switched off and HF_HOME points at a temporary
folder before any Hugging Face library is imported. `tiny_llama(...)` builds (once per session and
argument set) a random base model plus fine-tune-like variants with tests/tinymodels.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="evomerge-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import pytest  # noqa: E402

from tinymodels import build_family  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Factory: tiny_llama(arch="llama"|"mistral", n_experts=2, dtype="float32", tie=False, **config)
    -> TinyFamily (base + experts), cached for the session."""
    cache = {}

    def make(arch: str = "llama", n_experts: int = 2, dtype: str = "float32", tie: bool = False,
             seed: int = 0, **config_kwargs):
        key = (arch, n_experts, dtype, tie, seed, tuple(sorted(config_kwargs.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{dtype}-{'tied' if tie else 'untied'}")
            cache[key] = build_family(root, arch=arch, n_experts=n_experts, dtype=dtype, tie=tie,
                                      seed=seed, **config_kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a busy 2-core machine two threads are 10-20x slower
    (OpenMP spin waits). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

