"""Building blocks shared by the score networks.

Embeddings of the noise level and of the input, the ResNet and attention
blocks of the VDM ScoreUNet (google-research/vdm, Kingma et al. 2021), and
the conditioning MLP. All modules keep float32 parameters. With a
low-precision `dtype` (bfloat16, float16) only the convolutions and
attention projections of a block's branch compute in it; normalisations,
swish, the 1x1 shortcut, the conditioning MLP and the residual stream stay
float32, which keeps eps_hat within about 1e-2 relative of float32.
"""
import math
import numbers
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Dtype = Any

# Channel groups of every GroupNorm in the reference ScoreUNet (flax default).
NUM_GROUPS = 32


def check_inputs(z: jax.Array, g_t: ArrayLike, conditioning: ArrayLike | None,
                 labels: ArrayLike | None, num_classes: int) -> None:
  """Shape checks shared by all networks; raises ValueError naming expected and given.

  Expects z [B, H, W, C], g_t scalar or [B], conditioning [B] or None, labels [B] or None
  (labels only when num_classes > 0).
  """
  if z.ndim != 4:
    raise ValueError(f"z must have rank 4 [B, H, W, C], given shape {z.shape}")
  batch = z.shape[0]
  g_shape = jnp.shape(g_t)
  if len(g_shape) > 1 or (len(g_shape) == 1 and g_shape[0] != batch):
    raise ValueError(f"g_t must be a scalar or have shape ({batch},), given shape {g_shape}")
  if conditioning is not None and jnp.shape(conditioning) != (batch,):
    raise ValueError(f"conditioning must have shape ({batch},), given {jnp.shape(conditioning)}")
  if labels is not None:
    if num_classes == 0:
      raise ValueError("labels were given to a network built with num_classes=0")
    if jnp.shape(labels) != (batch,):
      raise ValueError(f"labels must have shape ({batch},), given {jnp.shape(labels)}")


def timestep_embedding(tau: jax.Array, dim: int) -> jax.Array:
  r"""Sinusoidal embedding of a normalised noise level (Vaswani et al. 2017).

  With u = 1000 tau and h = dim / 2 frequencies
  omega_k = exp(-k log(10000) / (h - 1)), k = 0..h-1:
    emb = [sin(u omega_0), ..., sin(u omega_{h-1}), cos(u omega_0), ...]
  (zero-padded by one column when dim is odd).

  Args:
    tau: normalised noise level, [B] (about [0, 1]).
    dim: embedding width, at least 4.

  Returns:
    float32 [B, dim].
  """
  if tau.ndim != 1:
    raise ValueError(f"timestep_embedding expects tau of rank 1 [B], given shape {tau.shape}")
  if dim < 4:
    raise ValueError(f"timestep_embedding expects dim >= 4, given {dim}")
  u = tau.astype(jnp.float32) * 1000
  half = dim // 2
  scale = math.log(10_000) / (half - 1)
  omega = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
  arg = u[:, None] * omega[None, :]
  emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _is_int(value):
  """Python and numpy integers (numbers.Integral), not bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
  """Python and numpy integers and floats (numbers.Real), not bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fourier_features(z: jax.Array, *, exponents: Sequence[float] = (6, 7)) -> jax.Array:
  r"""Base-2 Fourier features of the latent (VDM paper, appendix B).

  For each n in `exponents`, w_n = 2 pi 2^n; each channel c gives the features
  sin(w_n z_c) and cos(w_n z_c), laid out as
  [sin(z_0 w_n0), sin(z_0 w_n1), ..., sin(z_1 w_n0), ..., cos(...)].
  The reference uses n = 6, 7 (256 levels, bins 2/256 wide); for another
  vocab_size V, grid_fourier_exponents(V) puts the features on that data grid.

  Args:
    z: latent, [B, H, W, C].
    exponents: the exponents n (real numbers), a non-empty tuple.

  Returns:
    [B, H, W, 2 * C * len(exponents)], dtype of z.
  """
  exponents = tuple(exponents)
  if not exponents or not all(_is_real(n) for n in exponents):
    raise ValueError(f"exponents must be a non-empty tuple of numbers, given {exponents!r}")
  w = 2.0 ** jnp.asarray(exponents, dtype=z.dtype) * 2 * jnp.pi
  w = jnp.tile(w[None, :], (1, z.shape[-1]))
  h = jnp.repeat(z, len(exponents), axis=-1) * w
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def grid_fourier_exponents(vocab_size: int, count: int = 2) -> tuple[float, ...]:
  r"""Fourier exponents on a V-level data grid: n = log2(V / 2) - count + 1, ..., log2(V / 2).

  Data x in {0, ..., V - 1} is encoded as f_k = 2 (k + 0.5) / V - 1, levels 2 / V apart.
  The top exponent gives w = 2 pi 2^n = pi V, so w f_k = pi (2k + 1 - V) and, for
  f = f_k + delta, sin(w f) = (-1)^(V+1) sin(pi V delta) (likewise cos): the same function
  of the offset from the nearest level at every level, which lets the network snap z to
  the grid at low noise. Each lower exponent halves the frequency (the next one reads the
  level's parity). For V = 256, count = 2 this is (6, 7), the reference's exponents; for
  the 17 levels of the digits it is (2.0875, 3.0875), where the integers (2, 3) slip out
  of phase with the levels (the top feature by almost a whole period across [-1, 1]).

  Args:
    vocab_size: the number of levels V >= 2.
    count: how many exponents, >= 1.

  Returns:
    tuple of `count` floats, increasing (fourier_features' exponents).
  """
  if not (_is_int(vocab_size) and vocab_size >= 2 and _is_int(count) and count >= 1):
    raise ValueError(f"grid_fourier_exponents needs an int vocab_size >= 2 and an int count >= 1, "
                     f"given vocab_size={vocab_size!r}, count={count!r}")
  top = math.log2(vocab_size / 2)
  return tuple(top - i for i in reversed(range(count)))


def normalise_gamma(g_t: ArrayLike, batch: int, gamma_min: float, gamma_max: float) -> jax.Array:
  r"""Maps gamma_t to tau = (gamma_t - gamma_min) / (gamma_max - gamma_min), shape [B].

  Args:
    g_t: gamma_t, scalar, [] or [B].
    batch: B.
    gamma_min, gamma_max: the configured range (not the learned endpoints).

  Returns:
    float32 [B].
  """
  g_t = jnp.asarray(g_t, jnp.float32)
  if g_t.ndim > 1 or (g_t.ndim == 1 and g_t.shape[0] != batch):
    raise ValueError(f"g_t must be a scalar or have shape ({batch},), given shape {g_t.shape}")
  tau = (g_t - gamma_min) / (gamma_max - gamma_min)
  return jnp.broadcast_to(tau, (batch,))


def conditioning_vector(g_t: ArrayLike, conditioning: ArrayLike | None, labels: ArrayLike | None, *,
                        batch: int, n_embd: int, gamma_min: float, gamma_max: float,
                        num_classes: int = 0) -> jax.Array:
  r"""Conditioning vector from gamma_t, a conditioning scalar and optional labels.

  Call inside a compact `__call__`: it creates the parent's submodules
  `dense0`, `dense1` (and `label_emb`), keeping the reference layout.
    cond = swish(dense1(swish(dense0([temb(tau), c])) + label_emb(y)))
  with temb the sinusoidal embedding (width n_embd) of
  tau = (gamma_t - gamma_min) / (gamma_max - gamma_min) and c the reference's
  conditioning scalar (zeros when None). label_emb has num_classes + 1 rows,
  the last one the null label of classifier-free guidance; labels=None means
  the null label.

  Args:
    g_t: gamma_t, scalar or [B].
    conditioning: float [B] or None.
    labels: int [B] in [0, num_classes] or None.
    batch: B.
    n_embd: embedding width; dense0/dense1 have 4 * n_embd features.
    gamma_min, gamma_max: configured gamma range used to normalise gamma_t.
    num_classes: 0 for an unconditional network.

  Returns:
    float32 [B, 4 * n_embd] (this small MLP always computes in float32).
  """
  tau = normalise_gamma(g_t, batch, gamma_min, gamma_max)
  temb = timestep_embedding(tau, n_embd)
  if conditioning is None:
    conditioning = jnp.zeros((batch,), jnp.float32)
  h = jnp.concatenate([temb, jnp.asarray(conditioning, jnp.float32).reshape(batch, 1)], axis=1)
  h = nn.swish(nn.Dense(4 * n_embd, name="dense0")(h))
  if num_classes > 0:
    if labels is None:
      labels = jnp.full((batch,), num_classes, jnp.int32)
    emb = nn.Embed(num_classes + 1, 4 * n_embd, name="label_emb")(labels)
    h = h + emb.astype(h.dtype)
  elif labels is not None:
    raise ValueError("labels were given to a network built with num_classes=0")
  return nn.swish(nn.Dense(4 * n_embd, name="dense1")(h))


class ResnetBlock(nn.Module):
  """The reference ResNet block.

  GroupNorm -> swish -> conv1 -> + cond_proj(cond) -> GroupNorm -> swish ->
  dropout -> conv2 (zero init) -> + shortcut (nin_shortcut Dense when the
  channel count changes).
  """
  out_ch: Optional[int] = None
  dropout: float = 0.0
  num_groups: int = NUM_GROUPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
    """x + branch(x, cond) for x [B, H, W, C_in] and cond [B, E]; [B, H, W, out_ch].

    train enables dropout (needs the 'dropout' rng). Kingma et al. 2021 (reference ScoreUNet).
    """
    c_in = x.shape[-1]
    out_ch = c_in if self.out_ch is None else self.out_ch
    h = nn.swish(nn.GroupNorm(self.num_groups, dtype=jnp.float32, name="GroupNorm_0")(x))
    h = nn.Conv(out_ch, (3, 3), dtype=self.dtype, name="conv1")(h)
    h = h + nn.Dense(out_ch, use_bias=False, kernel_init=nn.initializers.zeros,
                     dtype=self.dtype, name="cond_proj")(cond)[:, None, None, :]
    h = nn.swish(nn.GroupNorm(self.num_groups, dtype=jnp.float32, name="GroupNorm_1")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(out_ch, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                name="conv2")(h)
    if c_in != out_ch:
      x = nn.Dense(out_ch, dtype=jnp.float32, name="nin_shortcut")(x)
    return x + h


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  r"""Attention over all positions: softmax(q k^T / sqrt(d)) v.

  The softmax is exp(w - logsumexp(w)) over keys, as in the reference (Vaswani et al. 2017).

  Args:
    q, k, v: [B, N, heads, d].

  Returns:
    [B, N, heads, d].
  """
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  w = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  p = jnp.exp(w - jax.scipy.special.logsumexp(w, axis=-1, keepdims=True))
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)


class AttnBlock(nn.Module):
  """Single-head self-attention residual block over all H*W positions.

  x + proj_out(attn(q(n), k(n), v(n))), n = GroupNorm(x); proj_out is zero
  initialised.
  """
  num_groups: int = NUM_GROUPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x + proj_out(attention(q, k, v)) over the H*W positions of x [B, H, W, C]; [B, H, W, C]."""
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(self.num_groups, dtype=jnp.float32, name="GroupNorm_0")(x)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h).reshape(b, hgt * wid, 1, c)
               for n in ("q", "k", "v"))
    h = attention(q, k, v).reshape(b, hgt, wid, c)
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj_out")(h)
    return x + h
