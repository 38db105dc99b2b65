"""ortho-diffusion: orthogonal finetuning (OFT, OFTv2, BOFT, GOFT, qGOFT) for diffusion models.

Public API::

    import ortho_diffusion as od
    cfg = od.AdapterConfig(method="boft", block_size=8, n_factors=2, targets="unet-attn")
    od.attach(unet, cfg)
    od.set_scale(unet_or_pipe, 0.5)
    od.merge(unet_or_pipe); od.unmerge(unet_or_pipe); od.detach(unet_or_pipe)
    od.save_adapter(unet_or_pipe, "subject.safetensors")
    od.load_adapter(unet_or_pipe, "subject.safetensors", scale=1.0)
    od.export("subject.safetensors", "lycoris", "subject-comfy.safetensors")
"""

from .adapter import OrthogonalAdapter
from .config import METHODS, AdapterConfig
from .formats import AdapterFileError, load_adapter, save_adapter
from .formats.export import ExportError, export
from .inject import (
    PRESETS,
    adapter_parameters,
    attach,
    detach,
    merge,
    orthogonality_penalty,
    set_scale,
    summary,
    unmerge,
)
from .version import __version__

__all__ = [
    "METHODS",
    "PRESETS",
    "AdapterConfig",
    "AdapterFileError",
    "ExportError",
    "OrthogonalAdapter",
    "__version__",
    "adapter_parameters",
    "attach",
    "detach",
    "export",
    "load_adapter",
    "merge",
    "orthogonality_penalty",
    "save_adapter",
    "set_scale",
    "summary",
    "unmerge",
]
