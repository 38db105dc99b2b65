"""Shared test setup: offline, deterministic, tiny models only."""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(params, std: float = 0.1, seed: int = 0) -> None:
    """Fill adapter parameters with non-zero values (magnitudes around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std
            p.copy_(noise + (1.0 if p.dim() == 1 and p.numel() > 1 and float(p.detach().mean()) == 1.0 else 0.0))


ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """Import one of the repo's scripts (``benchmarks/...py``, ``training/...py``) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module
