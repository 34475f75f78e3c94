"""The last step of every sampler: latent z_0 -> integer data (VDM categorical decoder)."""
import jax

from vdm_jax import decoders
from vdm_jax.sampling import grid
from vdm_jax.typing import GammaFn, PRNGKey


def to_data(z_0: jax.Array, gamma_fn: GammaFn, *, key: PRNGKey | None = None,
            vocab_size: int = 256) -> jax.Array:
  r"""Final decoding of a sampled z_0 to integers with the VDM categorical decoder.

  x = argmax_v p(x = v | z_0) (key None, the reference's generate_x) or a sample
  (Kingma et al. 2021; see vdm_jax.decoders.categorical_logprobs).

  Args:
    z_0: [B, H, W, C] latent at t = 0.
    gamma_fn: t [B] -> gamma [B]; gamma_0 = gamma_fn(0).
    key: optional PRNG key for sampling instead of argmax.
    vocab_size: V.

  Returns:
    int32 [B, H, W, C] in {0, ..., V - 1}.
  """
  gamma_0 = grid.gamma_at(gamma_fn, 0.0, z_0.shape[0])
  return decoders.decode(z_0, gamma_0, key=key, vocab_size=vocab_size)
