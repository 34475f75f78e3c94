"""A small diffusion transformer (DiT, Peebles & Xie 2023) noise predictor.

patchify (p x p conv, stride p) + fixed 2-D sin-cos position embedding ->
n_layer transformer blocks with adaLN-Zero conditioning on the vector built
from gamma_t, the conditioning scalar and labels -> adaLN final layer ->
unpatchify. All adaLN modulations and the output layer are zero
initialised, so every block starts as the identity and eps_hat = 0 at init.
"""
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from vdm_jax.nets import layers

Dtype = layers.Dtype


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  r"""Fixed 2-D sin-cos position embedding (Vaswani et al. 2017, per axis).

  Half of the dim encodes the row, half the column, each as
  [sin(p omega_k), cos(p omega_k)] with omega_k = 10000^(-k / (dim/4)).

  Args:
    grid_h, grid_w: token grid size.
    dim: width, a multiple of 4.

  Returns:
    float32 [grid_h * grid_w, dim] (numpy constant).
  """
  omega = 1.0 / 10_000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  parts = []
  for pos in (rows.reshape(-1), cols.reshape(-1)):
    arg = pos[:, None] * omega[None, :]
    parts += [np.sin(arg), np.cos(arg)]
  return np.concatenate(parts, axis=1).astype(np.float32)


def _modulate(x, shift, scale):
  """LayerNorm output x [B, N, D] scaled and shifted per example: x (1 + scale) + shift."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
  """x + gate1 * MHSA(adaLN(x)); x + gate2 * MLP(adaLN(x)), adaLN-Zero."""
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
    """The block on tokens x [B, N, D] with the conditioning vector cond [B, C]; [B, N, D].

    With (shift_k, scale_k, gate_k) = adaLN(cond) and LN without affine parameters:
      x <- x + gate_1 attn(LN(x) (1 + scale_1) + shift_1)
      x <- x + gate_2 MLP(LN(x) (1 + scale_2) + shift_2)     (Peebles & Xie 2023, adaLN-Zero)
    train enables the MLP's dropout.
    """
    b, n, d = x.shape
    # adaLN runs in float32: in bfloat16, 1 + scale would be rounded to steps of 2^-7.
    mod = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, name="adaLN")(cond)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    norm = lambda name: nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6,
                                     dtype=jnp.float32, name=name)
    h = _modulate(norm("norm1")(x), shift1, scale1)
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(h)
    q, k, v = (a.reshape(b, n, self.num_heads, d // self.num_heads)
               for a in jnp.split(qkv, 3, axis=-1))
    h = layers.attention(q, k, v).reshape(b, n, d)
    x = x + gate1[:, None, :] * nn.Dense(d, dtype=self.dtype, name="proj")(h)
    h = _modulate(norm("norm2")(x), shift2, scale2)
    h = nn.gelu(nn.Dense(4 * d, dtype=self.dtype, name="mlp_in")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return x + gate2[:, None, :] * nn.Dense(d, dtype=self.dtype, name="mlp_out")(h)


class DiT(nn.Module):
  """eps_hat = net(z, g_t, conditioning, labels, train=...), a transformer on patches.

  Attributes:
    n_embd: token width, a multiple of 4 and of num_heads.
    n_layer: number of transformer blocks.
    patch_size: p; H and W must be divisible by p.
    num_heads: attention heads.
    with_fourier_features: concatenate base-2 Fourier features of z.
    fourier_exponents: their exponents n (frequencies 2 pi 2^n).
    dropout: MLP dropout (train=True).
    gamma_min, gamma_max: range used to normalise gamma_t for the embedding.
    num_classes: 0 = no labels; else a label embedding with a null row.
    out_channels: channels of the output; 0 = those of z (eps_hat). model.grid_logits asks
      for C * V: V logits per value.
    dtype: compute dtype; parameters stay float32.
  """
  n_embd: int = 256
  n_layer: int = 8
  patch_size: int = 2
  num_heads: int = 4
  with_fourier_features: bool = True
  fourier_exponents: Tuple[float, ...] = (6, 7)
  dropout: float = 0.0
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  num_classes: int = 0
  out_channels: int = 0
  dtype: Dtype = jnp.float32

  def _check(self, z):
    p, d = self.patch_size, self.n_embd
    if z.shape[1] % p or z.shape[2] % p:
      raise ValueError(f"DiT with patch_size {p} needs H and W divisible by {p}, given z {z.shape}")
    if d % 4 or d % self.num_heads:
      raise ValueError(f"DiT width n_embd must be a multiple of 4 and of num_heads="
                       f"{self.num_heads}, given {d}")

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
    b, hgt, wid, c = z.shape
    p, d = self.patch_size, self.n_embd
    cond = layers.conditioning_vector(
        g_t, conditioning, labels, batch=b, n_embd=d, gamma_min=self.gamma_min,
        gamma_max=self.gamma_max, num_classes=self.num_classes)
    h = z
    if self.with_fourier_features:
      feats = layers.fourier_features(z.astype(jnp.float32), exponents=self.fourier_exponents)
      h = jnp.concatenate([z, feats], axis=-1)
    # Input/output layers compute in float32 and the residual stream stays float32; only
    # the blocks' branches compute in dtype (keeps eps_hat within about 1e-2 relative of float32).
    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(h)
    gh, gw = hgt // p, wid // p
    h = h.reshape(b, gh * gw, d) + sincos_position_embedding(gh, gw, d)
    for i in range(self.n_layer):
      h = DiTBlock(self.num_heads, self.dropout, self.dtype, name=f"block_{i}")(h, cond, train)
    shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=nn.initializers.zeros,
                                      name="final_adaLN")(cond), 2, axis=-1)
    h = nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, dtype=jnp.float32,
                     name="final_norm")(h)
    out = self.out_channels or c
    h = nn.Dense(p * p * out, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                 name="final_out")(_modulate(h, shift, scale))
    # Unpatchify: [B, gh*gw, p*p*out] -> [B, gh, p, gw, p, out] -> [B, H, W, out].
    h = h.reshape(b, gh, gw, p, p, out).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, hgt, wid, out)
