import math

import pytest
import torch

from conftest import load_script


def test_token_selectivity_compares_the_probe_token_with_the_others():
    wc = load_script("benchmarks/weight_change.py")
    eye = torch.eye(4)
    base = {"up.attn2.to_k": eye, "up.attn2.to_v": 2 * eye, "up.attn1.to_k": eye}
    # A change that reads only the first direction: the probe lies on it, the others barely.
    only_first = torch.zeros(4, 4)
    only_first[0, 0] = 0.5
    # A rotation by 90 degrees in the plane of the first two directions moves every vector
    # with a part in that plane, and by as much as its part there.
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    rotation = torch.eye(4)
    rotation[:2, :2] = turn
    deltas = {"up.attn2.to_k": only_first, "up.attn2.to_v": 2 * (rotation - eye), "up.attn1.to_k": only_first}
    probe = torch.tensor([1.0, 0.0, 0.0, 0.0])
    others = torch.tensor([[0.1, 1.0, 0.0, 0.0], [1.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])

    out = wc.token_selectivity(deltas, base, probe, others)
    assert set(out) == {"attn2.to_k", "attn2.to_v"}  # self-attention is not probed
    on_probe, on_others, ratio = out["attn2.to_k"]
    assert on_probe == pytest.approx(0.5)
    assert on_others == pytest.approx(0.05 / math.sqrt(1.01))  # median of 0.0497, 0.4975, 0
    assert ratio == pytest.approx(0.5 / (0.05 / math.sqrt(1.01)))
    on_probe, on_others, ratio = out["attn2.to_v"]
    assert on_probe == pytest.approx(math.sqrt(2))  # |R e - e| = sqrt(2) for a quarter turn
    assert on_others == pytest.approx(math.sqrt(2))  # median of sqrt(2), sqrt(2), 0: both in the plane
    assert ratio == pytest.approx(1.0)


def test_command_line_probes_a_shipped_subject_adapter(capsys):
    wc = load_script("benchmarks/weight_change.py")
    adapter = wc.ROOT / "assets" / "subjects" / "split-circle.safetensors"
    assert wc.main([str(adapter), "--probe_prompt", "a large sks circle in the center, on a black background",
                    "--probe_token", "sks", "--other_prompt", "a small blue circle on the right, on a black background"]) == 0
    out = capsys.readouterr().out
    probed = [line for line in out.splitlines() if "output change: sks" in line]
    assert [line.split()[0] for line in probed] == ["attn2.to_k", "attn2.to_v"]
    with pytest.raises(SystemExit):
        wc.main([str(adapter), "--probe_prompt", "a large circle", "--probe_token", "sks", "--other_prompt", "a square"])
