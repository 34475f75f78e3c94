"""A multi-resolution U-Net noise predictor (Ho et al. 2020; Dhariwal & Nichol 2021).

Levels of `n_layer` ResNet blocks at widths n_embd * channel_mult[level],
halving the resolution between levels (2x2 average pooling) and doubling it
on the way up (nearest neighbour), with skip connections, attention
at the resolutions listed in `attention_resolutions`, and the conditioning
vector (gamma_t, conditioning scalar, labels) entering every block as a
GroupNorm scale and shift, h <- GroupNorm(h) (1 + scale) + shift, so no part
of it is normalised away. The output conv is zero initialised, so
eps_hat = 0 at init.

With a low-precision dtype only the block branches (convolutions, attention)
compute in that dtype; the residual stream, the resampling, the 1x1
shortcuts, the normalisations and the conditioning stay float32.
"""
import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm_jax.nets import layers

Dtype = layers.Dtype


def num_groups(channels: int) -> int:
  """GroupNorm groups for a width: gcd(32, channels)."""
  return math.gcd(layers.NUM_GROUPS, channels)


class FiLMResnetBlock(nn.Module):
  """GroupNorm -> swish -> conv1 -> GroupNorm * (1 + scale) + shift -> swish -> dropout -> conv2 -> + skip."""
  out_ch: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
    """x + branch(x, cond) for x [B, H, W, C_in] and cond [B, E]; [B, H, W, out_ch].

    The branch modulates its second GroupNorm with (scale, shift) = cond_proj(cond) (FiLM,
    Perez et al. 2018; Dhariwal & Nichol 2021); train enables dropout.
    """
    c_in = x.shape[-1]
    h = nn.swish(nn.GroupNorm(num_groups(c_in), dtype=jnp.float32)(x))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv1")(h)
    # The modulation is float32: in bfloat16, 1 + scale would be rounded to steps of 2^-7.
    film = nn.Dense(2 * self.out_ch, kernel_init=nn.initializers.zeros,
                    name="cond_proj")(cond)[:, None, None, :]
    scale, shift = jnp.split(film, 2, axis=-1)
    h = nn.GroupNorm(num_groups(self.out_ch), dtype=jnp.float32)(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout)(nn.swish(h), deterministic=not train)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                name="conv2")(h)
    if c_in != self.out_ch:
      x = nn.Dense(self.out_ch, dtype=jnp.float32, name="nin_shortcut")(x)
    return x + h


def _upsample(h):
  """Nearest-neighbour 2x upsampling of [B, H, W, C] to [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


class UNet(nn.Module):
  """eps_hat = net(z, g_t, conditioning, labels, train=...), multi-resolution.

  Attributes:
    n_embd: base width; level l has n_embd * channel_mult[l] channels.
    n_layer: ResNet blocks per level on the way down (n_layer + 1 up).
    channel_mult: width multipliers, one level each; H and W must be
      divisible by 2 ** (len(channel_mult) - 1).
    attention_resolutions: feature-map sizes (H at that level) with attention.
    with_fourier_features: concatenate base-2 Fourier features of z.
    fourier_exponents: their exponents n (frequencies 2 pi 2^n).
    dropout: dropout rate inside the blocks (train=True).
    gamma_min, gamma_max: range used to normalise gamma_t for the embedding.
    num_classes: 0 = no labels; else a label embedding with a null row.
    out_channels: channels of the output; 0 = those of z (eps_hat). model.grid_logits asks
      for C * V: V logits per value.
    dtype: compute dtype; parameters stay float32.
  """
  n_embd: int = 128
  n_layer: int = 2
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  attention_resolutions: Sequence[int] = (16,)
  with_fourier_features: bool = True
  fourier_exponents: Tuple[float, ...] = (6, 7)
  dropout: float = 0.1
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  num_classes: int = 0
  out_channels: int = 0
  dtype: Dtype = jnp.float32

  def _check(self, z):
    factor = 2 ** (len(self.channel_mult) - 1)
    if z.ndim == 4 and (z.shape[1] % factor or z.shape[2] % factor):
      raise ValueError(f"UNet with {len(self.channel_mult)} levels needs H and W divisible by "
                       f"{factor}, given z of shape {z.shape}")

  @nn.compact
  def __call__(self, z: jax.Array, g_t: ArrayLike, conditioning: ArrayLike | None = None,
               labels: ArrayLike | None = None, *, train: bool = False) -> jax.Array:
    """Predicts the noise; z [B, H, W, C], g_t scalar or [B] -> eps_hat [B, H, W, C] (float32).

    [B, H, W, out_channels] when out_channels > 0. conditioning (float [B] or None), labels
    (int [B] in [0, num_classes] or None) and train (dropout) as in ScoreUNet.__call__, the
    call signature shared by vdm_jax.nets.
    """
    layers.check_inputs(z, g_t, conditioning, labels, self.num_classes)
    self._check(z)
    cond = layers.conditioning_vector(
        g_t, conditioning, labels, batch=z.shape[0], n_embd=self.n_embd,
        gamma_min=self.gamma_min, gamma_max=self.gamma_max, num_classes=self.num_classes)
    block = lambda ch, name: FiLMResnetBlock(ch, self.dropout, self.dtype, name=name)
    attn = lambda ch, name: layers.AttnBlock(num_groups(ch), self.dtype, name=name)
    h = z
    if self.with_fourier_features:
      feats = layers.fourier_features(z.astype(jnp.float32), exponents=self.fourier_exponents)
      h = jnp.concatenate([z, feats], axis=-1)
    # Input/output layers compute in float32 and the residual stream stays float32; only
    # the blocks' branches compute in dtype (keeps eps_hat within about 1e-2 relative of float32).
    h = nn.Conv(self.n_embd, (3, 3), name="conv_in")(h)
    hs, res, last = [h], z.shape[1], len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      ch = self.n_embd * mult
      for i in range(self.n_layer):
        h = block(ch, f"down_{level}.block_{i}")(h, cond, train)
        if res in self.attention_resolutions:
          h = attn(ch, f"down_{level}.attn_{i}")(h)
        hs.append(h)
      if level != last:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        hs.append(h)
        res //= 2
    ch = h.shape[-1]
    h = block(ch, "mid.block_1")(h, cond, train)
    h = attn(ch, "mid.attn_1")(h)
    h = block(ch, "mid.block_2")(h, cond, train)
    for level in reversed(range(len(self.channel_mult))):
      ch = self.n_embd * self.channel_mult[level]
      for i in range(self.n_layer + 1):
        h = block(ch, f"up_{level}.block_{i}")(jnp.concatenate([h, hs.pop()], axis=-1), cond, train)
        if res in self.attention_resolutions:
          h = attn(ch, f"up_{level}.attn_{i}")(h)
      if level != 0:
        h = _upsample(h)
        res *= 2
    h = nn.swish(nn.GroupNorm(num_groups(h.shape[-1]), dtype=jnp.float32, name="GroupNorm_0")(h))
    return nn.Conv(self.out_channels or z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                   dtype=jnp.float32, name="conv_out")(h)
