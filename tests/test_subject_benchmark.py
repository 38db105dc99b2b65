"""The subject benchmark's learning-rate overrides (its full run is a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "subject_fidelity.py"


def _module():
    spec = importlib.util.spec_from_file_location("subject_fidelity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_rate_defaults_and_overrides():
    mod = _module()
    args = Namespace(lr_overrides={"oft": 1e-3})
    assert mod.learning_rate("oft", args) == "0.001"
    assert mod.learning_rate("lora", args) == "1e-3"  # the default of METHOD_FLAGS
