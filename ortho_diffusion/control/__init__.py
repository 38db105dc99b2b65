"""Controllable generation: a light control encoder trained with orthogonal adapters.

    import ortho_diffusion as od
    from ortho_diffusion import control
    od.load_adapter(pipe, "assets/control/canny.safetensors")   # rotations + control encoder
    edges = control.canny(photo)                                 # a preprocessor
    image = pipe("a red circle", image=edges, control_scale=1.0).images[0]

Modules: :mod:`.encoder` (the encoder and its ``conv_in`` wrapper), :mod:`.storage` (its
part of the adapter file), :mod:`.pipeline` (diffusers integration), :mod:`.preprocess`
(Canny, face landmarks, segmentation maps), :mod:`.data` (training datasets),
:mod:`.metrics` (Canny IoU/F1, segmentation mIoU, landmark error).
"""

from .encoder import (
    ControlEncoder,
    ControlEncoderConfig,
    ControlledConvIn,
    attach_control,
    control_encoders,
    control_images,
    set_control,
)
from .pipeline import (
    StableDiffusionControlPipeline,
    StableDiffusionXLControlPipeline,
    disable_control,
    enable_control,
    prepare_control_image,
)

__all__ = [
    "ControlEncoder",
    "ControlEncoderConfig",
    "ControlledConvIn",
    "StableDiffusionControlPipeline",
    "StableDiffusionXLControlPipeline",
    "attach_control",
    "control_encoders",
    "control_images",
    "disable_control",
    "enable_control",
    "prepare_control_image",
    "set_control",
]
