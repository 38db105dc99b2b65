"""Training of the embedded shapes-world base model (see :mod:`.trainer`)."""

from .models import ModelSizes, make_scheduler, make_text_encoder, make_unet, make_vae
from .tokenizer import MAX_LENGTH, build_tokenizer
from .trainer import BaseTrainer, TrainConfig, train

__all__ = [
    "MAX_LENGTH",
    "BaseTrainer",
    "ModelSizes",
    "TrainConfig",
    "build_tokenizer",
    "make_scheduler",
    "make_text_encoder",
    "make_unet",
    "make_vae",
    "train",
]
