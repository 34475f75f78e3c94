"""Flax modules: score networks sharing one call signature, and learned schedules.

Every network is called as `net.apply(variables, z, g_t, conditioning, labels, train=...)`
with z [B, H, W, C], g_t scalar or [B] (gamma_t, not t), conditioning float [B] or None,
labels int [B] in [0, num_classes] (num_classes = null label) or None.
"""
from vdm_jax.nets.dit import DiT
from vdm_jax.nets.ensemble import Ensemble
from vdm_jax.nets.schedules import FixedSchedule
from vdm_jax.nets.schedules import LearnedLinear
from vdm_jax.nets.schedules import LearnedMonotone
from vdm_jax.nets.schedules import LearnedNNet
from vdm_jax.nets.score_unet import ScoreUNet
from vdm_jax.nets.unet import UNet

__all__ = [
    "DiT",
    "Ensemble",
    "FixedSchedule",
    "LearnedLinear",
    "LearnedMonotone",
    "LearnedNNet",
    "ScoreUNet",
    "UNet",
]
