"""The VDM score network (ScoreUNet of google-research/vdm), parameter-compatible.

A U-Net without resolution changes: conv_in -> n_layer ResNet blocks (each
optionally followed by attention) -> middle (block, attention, block) ->
n_layer + 1 up blocks fed with skip connections -> GroupNorm -> swish ->
conv_out. It predicts eps with the input added back ("base measure"):
eps_hat = z + conv_out(...). Kingma et al. 2021, appendix B. With out_channels > 0 it
returns conv_out(...) alone (model.grid_logits: logits, not a noise estimate).
"""
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.nets import layers

Dtype = layers.Dtype


class ScoreUNet(nn.Module):
  """eps_hat = net(z, g_t, conditioning, labels, train=...), reference layout.

  Attributes:
    n_embd: channels of every block (reference sm_n_embd); a multiple of 32.
    n_layer: number of down blocks (reference sm_n_layer).
    with_attention: attention after every down/up block (the middle one is
      always present).
    with_fourier_features: concatenate base-2 Fourier features of z.
    fourier_exponents: their exponents n (frequencies 2 pi 2^n).
    dropout: dropout rate inside the ResNet blocks (active with train=True).
    gamma_min, gamma_max: range used to normalise gamma_t for the embedding.
    num_classes: 0 = no labels; else a label embedding with a null row.
    out_channels: 0 = eps_hat = z + conv_out (the reference); else conv_out alone with
      that many channels (model.grid_logits asks for C * V: V logits per value).
    dtype: compute dtype; parameters stay float32.
  """
  n_embd: int = 128
  n_layer: int = 32
  with_attention: bool = False
  with_fourier_features: bool = True
  fourier_exponents: Tuple[float, ...] = (6, 7)
  dropout: float = 0.1
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  num_classes: int = 0
  out_channels: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, g_t: ArrayLike, conditioning: ArrayLike | None = None,
               labels: ArrayLike | None = None, *, train: bool = False) -> jax.Array:
    """Predicts the noise.

    Args:
      z: latent z_t, float [B, H, W, C].
      g_t: gamma_t, scalar or [B].
      conditioning: the reference's conditioning scalar, float [B] or None (zeros).
      labels: int [B] in [0, num_classes] (num_classes = null label) or None.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      eps_hat, [B, H, W, C] (float32 for float32 z).
    """
    layers.check_inputs(z, g_t, conditioning, labels, self.num_classes)
    batch, n = z.shape[0], self.n_embd
    cond = layers.conditioning_vector(
        g_t, conditioning, labels, batch=batch, n_embd=n, gamma_min=self.gamma_min,
        gamma_max=self.gamma_max, num_classes=self.num_classes)
    h = z
    if self.with_fourier_features:
      feats = layers.fourier_features(z.astype(jnp.float32), exponents=self.fourier_exponents)
      h = jnp.concatenate([z, feats], axis=-1)
    # Input/output layers compute in float32 and the residual stream stays float32; only
    # the blocks' branches compute in dtype (keeps eps_hat within about 1e-2 relative of float32).
    h = nn.Conv(n, (3, 3), name="conv_in")(h)
    block = lambda name, **kw: layers.ResnetBlock(dropout=self.dropout, dtype=self.dtype,
                                                  name=name, **kw)
    attn = lambda name: layers.AttnBlock(dtype=self.dtype, name=name)
    hs = [h]
    for i in range(self.n_layer):
      h = block(f"down.block_{i}", out_ch=n)(hs[-1], cond, train)
      if self.with_attention:
        h = attn(f"down.attn_{i}")(h)
      hs.append(h)
    h = block("mid.block_1")(hs[-1], cond, train)
    h = attn("mid.attn_1")(h)
    h = block("mid.block_2")(h, cond, train)
    for i in range(self.n_layer + 1):
      h = block(f"up.block_{i}", out_ch=n)(jnp.concatenate([h, hs.pop()], axis=-1), cond, train)
      if self.with_attention:
        h = attn(f"up.attn_{i}")(h)
    h = nn.swish(nn.GroupNorm(layers.NUM_GROUPS, dtype=jnp.float32, name="GroupNorm_0")(h))
    out = nn.Conv(self.out_channels or z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                  dtype=jnp.float32, name="conv_out")(h)
    return out if self.out_channels else z + out
