"""vdm_jax: Variational Diffusion Models (and DDPM as a special case) in JAX/Flax.

The math core is importable without TensorFlow or Flax:

  import vdm_jax
  gamma_fn = vdm_jax.fixed_linear(-13.3, 5.0)
  loss, terms = vdm_jax.vdm_loss(eps_fn, gamma_fn, x, key)   # nats per example, [B]

Conventions (see each docstring): gamma = -log SNR, alpha^2 = sigmoid(-gamma),
sigma^2 = sigmoid(gamma); images NHWC; losses in nats summed over H, W, C.
Networks, the model object and the trainer live in `vdm_jax.nets`,
`vdm_jax.model` and `vdm_jax.train` (imported on demand); the type aliases of the
signatures (EpsFn, GammaFn, PRNGKey, LossFn, Terms, ...) in `vdm_jax.typing`.
"""
from vdm_jax import ddpm
from vdm_jax import decoders
from vdm_jax import gaussian
from vdm_jax import likelihood
from vdm_jax import losses
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import weighted_losses
from vdm_jax.sampling import guidance  # vdm_jax.guidance and vdm_jax.ode: their old homes
from vdm_jax.sampling import ode
from vdm_jax.ddpm import ddpm_bound
from vdm_jax.decoders import categorical_logprobs
from vdm_jax.decoders import decode
from vdm_jax.decoders import encode
from vdm_jax.gaussian import forward_marginal
from vdm_jax.gaussian import kl_normal
from vdm_jax.gaussian import posterior
from vdm_jax.gaussian import transition
from vdm_jax.likelihood import evaluate_bpd
from vdm_jax.losses import bits_per_dim
from vdm_jax.losses import diffusion_loss
from vdm_jax.losses import discrete_diffusion_loss
from vdm_jax.losses import prior_loss
from vdm_jax.losses import reconstruction_loss
from vdm_jax.variance_minimising import variance_minimising_vdm_loss
from vdm_jax.losses import vdm_loss
from vdm_jax.losses import vdm_loss_from_noise
from vdm_jax.sampling import ancestral_sample
from vdm_jax.sampling import classifier_free_guidance
from vdm_jax.sampling import ddim_sample
from vdm_jax.sampling import interpolate
from vdm_jax.sampling import ode_sample
from vdm_jax.schedules import alpha_sigma
from vdm_jax.schedules import cosine
from vdm_jax.schedules import ddpm_betas
from vdm_jax.schedules import fixed_linear
from vdm_jax.schedules import from_betas

__version__ = "0.1.0"

__all__ = [
    "alpha_sigma",
    "ancestral_sample",
    "bits_per_dim",
    "categorical_logprobs",
    "classifier_free_guidance",
    "cosine",
    "ddim_sample",
    "ddpm",
    "ddpm_betas",
    "ddpm_bound",
    "decode",
    "decoders",
    "diffusion_loss",
    "discrete_diffusion_loss",
    "encode",
    "evaluate_bpd",
    "fixed_linear",
    "forward_marginal",
    "from_betas",
    "gaussian",
    "guidance",
    "interpolate",
    "kl_normal",
    "likelihood",
    "losses",
    "ode",
    "ode_sample",
    "posterior",
    "prior_loss",
    "reconstruction_loss",
    "sampling",
    "schedules",
    "transition",
    "variance_minimising_vdm_loss",
    "vdm_loss",
    "vdm_loss_from_noise",
    "weighted_losses",
]
