"""Parity with peft's OFT and BOFT layers when both hold the same rotation.

Mapping (documented in the README):
* peft OFT, exact Cayley (``use_cayley_neumann=False``): ``oft_R.weight`` (r, b(b-1)/2) is
  our ``generators[0]`` unchanged; peft's Cayley-Neumann path builds the transposed
  rotation, which is ours with the generators negated.
* peft BOFT: ``boft_R`` (m, r, b, b) holds unconstrained matrices ``A``; our factor ``k``
  has ``Q_k = (A_k - A_k^T) / 2`` (packed), same butterfly permutations and factor order
  for ``m <= 2``; ``boft_s`` is our ``magnitude``.
"""

import pytest
import torch
from torch import nn

import ortho_diffusion as od
from ortho_diffusion.rotations import pack_skew

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 24)

    def forward(self, x):
        return self.proj(x)


class _CpuBlockDiag:
    """Stands in for peft's CUDA block-diagonal extension so BOFT keeps all its factors."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*factor) for factor in x])]

    @staticmethod
    def backward(grad, x):
        n, r, b, _ = x.shape
        blocks = torch.stack([torch.stack([g[i * b : (i + 1) * b, i * b : (i + 1) * b] for i in range(r)]) for g in grad])
        return [blocks]


def ours(method, **kw):
    torch.manual_seed(0)
    model = Tiny()
    od.attach(model, od.AdapterConfig(method=method, targets=["proj"], **kw))
    return model


def test_oft_exact_cayley_parity():
    from peft import OFTConfig, inject_adapter_in_model

    x = torch.randn(4, 32)
    mine = ours("oft", block_size=8)
    torch.manual_seed(0)
    theirs = inject_adapter_in_model(
        OFTConfig(oft_block_size=8, r=0, target_modules=["proj"], use_cayley_neumann=False), Tiny()
    )
    packed = torch.randn(4, 28) * 0.1
    with torch.no_grad():
        theirs.proj.oft_R["default"].weight.copy_(packed)
        mine.proj.rotations["default"].generators[0].copy_(packed)
        torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)
        assert (mine(x) - mine.proj.base_layer(x)).abs().max() > 1e-2


def test_oft_neumann_path_is_the_transposed_rotation():
    from peft import OFTConfig, inject_adapter_in_model

    x = torch.randn(4, 32)
    mine = ours("oftv2", block_size=8)
    theirs = inject_adapter_in_model(
        OFTConfig(oft_block_size=8, r=0, target_modules=["proj"], use_cayley_neumann=True, num_cayley_neumann_terms=6),
        Tiny(),
    )
    with torch.no_grad():
        theirs.proj.base_layer.load_state_dict(mine.proj.base_layer.state_dict())
        packed = torch.randn(4, 28) * 0.05  # inside our Neumann guard (norm 0.5)
        theirs.proj.oft_R["default"].weight.copy_(packed)
        mine.proj.rotations["default"].generators[0].copy_(-packed)
        # peft's n terms sum to I + 2Q + ... + 2Q^(n-2) + Q^(n-1): ours with n - 2.
        mine.proj.rotations["default"].neumann_terms = 4
        torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)
        mine.proj.rotations["default"].neumann_terms = 6
        assert (mine(x) - theirs(x)).abs().max() > 1e-5  # the term count matters at this size


@pytest.mark.parametrize("n_factors", [1, 2])
def test_boft_parity(monkeypatch, n_factors):
    import peft.tuners.boft.layer as boft_layer
    from peft import BOFTConfig, inject_adapter_in_model

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _CpuBlockDiag)
    x = torch.randn(4, 32)
    mine = ours("boft", block_size=4, n_factors=n_factors, rescale=True)
    theirs = inject_adapter_in_model(
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=n_factors, target_modules=["proj"]), Tiny()
    )
    layer = theirs.proj
    assert layer.boft_R["default"].shape[0] == n_factors  # peft kept every factor
    with torch.no_grad():
        layer.base_layer.load_state_dict(mine.proj.base_layer.state_dict())
        a = torch.randn_like(layer.boft_R["default"]) * 0.2
        s = 1 + 0.1 * torch.randn_like(layer.boft_s["default"])
        layer.boft_R["default"].copy_(a)
        layer.boft_s["default"].copy_(s)
        mine.proj.rotations["default"].generators.copy_(pack_skew((a - a.transpose(-1, -2)) / 2))
        mine.proj.magnitudes["default"].copy_(s.squeeze(-1))
        torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)
        assert (mine(x) - mine.proj.base_layer(x)).abs().max() > 1e-2
