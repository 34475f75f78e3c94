r"""Samplers for VDM / DDPM: ancestral, DDIM, probability-flow ODE, predictor-corrector,
classifier-free guidance and editing. All take `eps_fn(z_t, gamma_t)` and `gamma_fn(t)`.

Every sampler starts from z_1 ~ N(0, I) of the given shape (B, H, W, C) and returns
the latent z_0 (decode it with `to_data` / vdm_jax.decoders.decode). They are pure
JAX loops (lax.fori_loop) and can be wrapped in jax.jit as a whole, keeping eps_fn /
gamma_fn as closures over traced parameters:

  sample = jax.jit(lambda params, key: ancestral_sample(
      model.eps_fn(params), model.gamma_fn(params), key, (16, 32, 32, 3)))

Modules: grid (time grids, checks), ancestral, ddim, ode, pc, guidance, editing, decoding.
"""
from vdm_jax.sampling import ancestral
from vdm_jax.sampling import ddim
from vdm_jax.sampling import decoding
from vdm_jax.sampling import editing
from vdm_jax.sampling import grid
from vdm_jax.sampling import guidance
from vdm_jax.sampling import ode
from vdm_jax.sampling import pc
from vdm_jax.sampling.ancestral import VARIANCES
from vdm_jax.sampling.ancestral import ancestral_sample
from vdm_jax.sampling.ancestral import ancestral_step
from vdm_jax.sampling.ancestral import ddpm_sample
from vdm_jax.sampling.ddim import ddim_sample
from vdm_jax.sampling.ddim import ddim_step
from vdm_jax.sampling.ddim import ddim_update
from vdm_jax.sampling.decoding import to_data
from vdm_jax.sampling.editing import ddim_decode
from vdm_jax.sampling.editing import ddim_encode
from vdm_jax.sampling.editing import interpolate
from vdm_jax.sampling.editing import reconstruct
from vdm_jax.sampling.editing import slerp
from vdm_jax.sampling.grid import check_times
from vdm_jax.sampling.grid import gamma_at
from vdm_jax.sampling.grid import time_grid
from vdm_jax.sampling.guidance import classifier_free_guidance
from vdm_jax.sampling.ode import SOLVERS
from vdm_jax.sampling.ode import ode_sample
from vdm_jax.sampling.ode import ode_solve
from vdm_jax.sampling.pc import pc_sample

__all__ = [
    "SOLVERS",
    "VARIANCES",
    "ancestral",
    "ancestral_sample",
    "ancestral_step",
    "check_times",
    "classifier_free_guidance",
    "ddim",
    "ddim_decode",
    "ddim_encode",
    "ddim_sample",
    "ddim_step",
    "ddim_update",
    "ddpm_sample",
    "decoding",
    "editing",
    "gamma_at",
    "grid",
    "guidance",
    "interpolate",
    "ode",
    "ode_sample",
    "ode_solve",
    "pc",
    "pc_sample",
    "reconstruct",
    "slerp",
    "time_grid",
    "to_data",
]
