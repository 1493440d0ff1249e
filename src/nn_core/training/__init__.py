"""Training: configuration, optimizer (schedule, AdamW, clipping), fused kernels, the Trainer."""

from .config import DEFAULT_RUN, TrainConfig
from .optim import AdamW, clip_grad_norm, get_lr, global_norm
from .trainer import Trainer

__all__ = [
    "DEFAULT_RUN",
    "AdamW",
    "TrainConfig",
    "Trainer",
    "clip_grad_norm",
    "get_lr",
    "global_norm",
]
