"""Noise schedules gamma(t) = -log SNR(t) as Flax modules (learned or fixed).

Every module maps times t of any shape to gamma(t) of the same shape
(float32) and is increasing in t for every value of its parameters: each
kernel enters through its absolute value and every nonlinearity is
increasing. Kingma et al. 2021, sec. 3.4 and appendix H.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def _constant(value):
  return nn.initializers.constant(value)


class FixedSchedule(nn.Module):
  """Wraps a parameter-free gamma_fn (e.g. vdm_jax.schedules.fixed_linear) as a module."""
  gamma_fn: Callable

  def __call__(self, t: ArrayLike) -> jax.Array:
    """gamma_fn(t), float32 with the shape of t."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.broadcast_to(jnp.asarray(self.gamma_fn(t), jnp.float32), t.shape)


class LearnedLinear(nn.Module):
  r"""gamma(t) = b + |w| t (reference `learnable_scalar`), leaves w, b of shape (1,).

  Initialised to gamma(0) = gamma_min, gamma(1) = gamma_max.
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  @nn.compact
  def __call__(self, t: ArrayLike) -> jax.Array:
    """gamma(t), float32 with the shape of t."""
    w = self.param("w", _constant(self.gamma_max - self.gamma_min), (1,))
    b = self.param("b", _constant(self.gamma_min), (1,))
    t = jnp.asarray(t, jnp.float32)
    return b[0] + jnp.abs(w[0]) * t


class DenseMonotone(nn.Module):
  """Dense layer y = x |K| + b, increasing in every input (kernel [in, out])."""
  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.normal(stddev=1e-2)
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """y = x |K| + b for x [..., in]; [..., features]."""
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = jax.lax.dot_general(x, jnp.abs(kernel), (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y


def _monotone_mlp(t, l1, l2, l3, n_features):
  r"""l1(t) + l3(2 (sigmoid(l2(2t - 1)) - 1/2)) / n_features on t [N, 1]: [N]."""
  h = l1(t)
  u = l2(2.0 * (t - 0.5))
  u = 2 * (jax.nn.sigmoid(u) - 0.5)  # increasing, in (-1, 1)
  h = h + l3(u) / n_features
  return jnp.squeeze(h, axis=-1)


class LearnedNNet(nn.Module):
  r"""The reference monotone network (`learnable_nnet`), leaves gamma/l1, l2, l3.

    l1(t) = |k1| t + b1        (k1 init gamma_max - gamma_min, b1 init gamma_min)
    h(t) = 2 (sigmoid(|k2| (2t - 1) + b2) - 1/2)    (k2 [1, n_features])
    gamma(t) = l1(t) + h(t) |k3| / n_features       (k3 [n_features, 1], no bias)

  k2, k3 are initialised N(0, 0.01^2) (flax `normal()`), b2 zero.
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  n_features: int = 1024

  @nn.compact
  def __call__(self, t: ArrayLike) -> jax.Array:
    """gamma(t), float32 with the shape of t."""
    t = jnp.asarray(t, jnp.float32)
    l1 = DenseMonotone(1, kernel_init=_constant(self.gamma_max - self.gamma_min),
                       bias_init=_constant(self.gamma_min), name="l1")
    l2 = DenseMonotone(self.n_features, name="l2")
    l3 = DenseMonotone(1, use_bias=False, name="l3")
    g = _monotone_mlp(t.reshape(-1, 1), l1, l2, l3, self.n_features)
    return g.reshape(t.shape)


class LearnedMonotone(nn.Module):
  r"""The paper's normalised learned schedule (VDM appendix H).

    gamma(t) = gamma_0 + (gamma_1 - gamma_0) * (g(t) - g(0)) / (g(1) - g(0))

  with endpoints gamma_0 = b and gamma_1 = b + |w| (leaves `b`, `w`, shape (1,),
  initialised to gamma_min and gamma_max - gamma_min) and a monotone network g
  (leaves l1, l2, l3 as in `LearnedNNet`, l1 initialised to the identity).
  The endpoints set the bound's prior and reconstruction terms; the shape
  g only redistributes the diffusion loss over t (its expectation is
  invariant to it), which is what `variance_minimising` training exploits.
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  n_features: int = 1024

  def setup(self) -> None:
    """Declares the endpoint leaves w, b (1,) and the shape network l1, l2, l3."""
    self.w = self.param("w", _constant(self.gamma_max - self.gamma_min), (1,))
    self.b = self.param("b", _constant(self.gamma_min), (1,))
    self.l1 = DenseMonotone(1, kernel_init=_constant(1.0), bias_init=nn.initializers.zeros)
    self.l2 = DenseMonotone(self.n_features)
    self.l3 = DenseMonotone(1, use_bias=False)

  def endpoints(self) -> tuple[jax.Array, jax.Array]:
    """(gamma_0, gamma_1) = (b, b + |w|), float32 scalars."""
    return self.b[0], self.b[0] + jnp.abs(self.w[0])

  def shape(self, t: ArrayLike) -> jax.Array:
    r"""The normalised shape (g(t) - g(0)) / (g(1) - g(0)), increasing from 0 to 1; shape of t."""
    t = jnp.asarray(t, jnp.float32)
    ends = jnp.array([[0.0], [1.0]], jnp.float32)
    g = _monotone_mlp(jnp.concatenate([t.reshape(-1, 1), ends]), self.l1, self.l2, self.l3,
                      self.n_features)
    g_t, g_0, g_1 = g[:-2], g[-2], g[-1]
    return ((g_t - g_0) / (g_1 - g_0)).reshape(t.shape)

  def __call__(self, t: ArrayLike) -> jax.Array:
    """gamma(t), float32 with the shape of t."""
    gamma_0, gamma_1 = self.endpoints()
    return gamma_0 + (gamma_1 - gamma_0) * self.shape(t)
