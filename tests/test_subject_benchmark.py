"""The subject benchmark's learning-rate overrides (its full run is a benchmark, not a test)."""

from __future__ import annotations

from argparse import Namespace

from conftest import load_script


def test_learning_rate_defaults_and_overrides():
    mod = load_script("benchmarks/subject_fidelity.py")
    args = Namespace(lr_overrides={"oft": 1e-3})
    assert mod.learning_rate("oft", args) == "0.001"
    assert mod.learning_rate("lora", args) == "1e-3"  # the default of METHOD_FLAGS
