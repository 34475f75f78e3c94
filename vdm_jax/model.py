"""The VDM model object: a config tied to a score network and a noise schedule.

`VDM(ModelConfig(...))` holds no parameters and no randomness; `init`
returns a plain parameter dict in the layout of google-research/vdm
({"score_model": ..., "gamma": ...}, "gamma" absent for fixed schedules, plus
"grid_prior" with ModelConfig.grid_prior) and
`loss`, `gamma_fn`, `eps_fn` are pure functions of it, built on
vdm_jax.losses (Kingma et al. 2021):

  model = VDM(ModelConfig(image_shape=(32, 32, 3)))
  params = model.init(key, x)
  loss, metrics = model.loss(params, x, key)        # nats per example, [B]
  z_0 = sampling.ancestral_sample(model.eps_fn(params), model.gamma_fn(params), key, shape)
"""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from vdm_jax import _numerics
from vdm_jax import decoders
from vdm_jax import losses
from vdm_jax import nets
from vdm_jax import schedules
from vdm_jax import time_sampling
from vdm_jax import variance_minimising
from vdm_jax.sampling import guidance
from vdm_jax.typing import EpsFn, GammaFn, Params, PRNGKey, Terms

NETWORKS: tuple[str, ...] = ("score_unet", "unet", "dit")
SCHEDULES: tuple[str, ...] = ("fixed_linear", "learned_linear", "learned_nnet", "learned_monotone",
                              "cosine")
DTYPES: dict[str, DTypeLike] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                               "float16": jnp.float16}


def _fail(field, expected, given):
  raise ValueError(f"ModelConfig.{field}: expected {expected}, given {given!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a model; see each field. Validated on construction."""
  vocab_size: int = 256
  image_shape: Tuple[int, int, int] = (32, 32, 3)  # H, W, C
  num_classes: int = 0  # 0 = unconditional; else labels in [0, num_classes), null = num_classes
  network: str = "score_unet"  # "score_unet" | "unet" | "dit"
  n_embd: int = 128  # score_unet/unet base width, DiT width
  n_layer: int = 32  # score_unet: blocks; unet: blocks per resolution; dit: depth
  with_attention: bool = False
  with_fourier_features: bool = True
  fourier_exponents: Tuple[float, ...] = (6, 7)  # n (2 pi 2^n); nets.layers.grid_fourier_exponents
  grid_skip: bool = False  # eps_hat = network + decoders.grid_noise_estimate (the V-level grid's)
  # The network outputs V logits per value (C * V channels), which join the prior's:
  grid_logits: bool = False  # eps_hat = decoders.grid_noise_estimate under them (no skip)
  grid_prior: bool = False  # a learned prior for either: params["grid_prior"] [H, W, C, V] logits
  dropout: float = 0.1
  channel_mult: Tuple[int, ...] = (1, 2, 2, 2)  # unet only
  attention_resolutions: Tuple[int, ...] = (16,)  # unet only
  patch_size: int = 2  # dit only
  num_heads: int = 4  # dit only
  ensemble_size: int = 1  # > 1: the mean of that many separately trained networks (nets.Ensemble)
  schedule: str = "learned_linear"
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  num_steps: int = 0  # T: 0 = continuous time
  antithetic: bool = True
  variance_minimising: bool = False  # VDM appendix I.2, needs schedule="learned_monotone"
  # Times t ~ q in `loss` (importance sampling, vdm_jax.time_sampling): q's M equal-bin
  # probabilities, renormalised to sum 1; () = uniform t.
  time_proposal: Tuple[float, ...] = ()
  label_dropout: float = 0.1  # classifier-free guidance training
  dtype: str = "float32"  # compute dtype; params and loss stay float32

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(self.image_shape))
    object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
    object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
    self._check_basic()
    self._check_network()
    self._check_time_proposal()

  def _check_basic(self):
    if not (_numerics.is_int(self.vocab_size) and self.vocab_size >= 2):
      _fail("vocab_size", "an int >= 2", self.vocab_size)
    if len(self.image_shape) != 3 or not all(_numerics.is_int(d) and d > 0 for d in self.image_shape):
      _fail("image_shape", "(H, W, C) of positive ints", self.image_shape)
    if not (_numerics.is_int(self.num_classes) and self.num_classes >= 0):
      _fail("num_classes", "an int >= 0", self.num_classes)
    f = self.fourier_exponents
    if not (isinstance(f, (tuple, list)) and f
            and all((_numerics.is_int(n) or _numerics.is_number(n)) and 0 <= n <= 16 for n in f)):
      _fail("fourier_exponents", "a non-empty tuple of numbers in [0, 16]", f)
    object.__setattr__(self, "fourier_exponents",
                       tuple(int(n) if _numerics.is_int(n) else float(n) for n in f))
    if self.network not in NETWORKS:
      _fail("network", f"one of {NETWORKS}", self.network)
    if self.schedule not in SCHEDULES:
      _fail("schedule", f"one of {SCHEDULES}", self.schedule)
    if self.dtype not in DTYPES:
      _fail("dtype", f"one of {tuple(DTYPES)}", self.dtype)
    if not self.gamma_max > self.gamma_min:
      _fail("gamma_max", f"> gamma_min = {self.gamma_min}", self.gamma_max)
    if not (_numerics.is_int(self.num_steps) and self.num_steps >= 0):
      _fail("num_steps", "an int >= 0 (0 = continuous time)", self.num_steps)
    for name in ("dropout", "label_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        _fail(name, "a rate in [0, 1)", getattr(self, name))
    for name in ("grid_skip", "grid_logits", "grid_prior"):
      if not isinstance(getattr(self, name), bool):
        _fail(name, "True or False", getattr(self, name))
    if self.grid_prior and not (self.grid_skip or self.grid_logits):
      _fail("grid_prior", "False unless grid_skip or grid_logits is True (their prior)", True)
    if self.grid_logits and self.grid_skip:
      _fail("grid_logits", "False with grid_skip=True (two readouts of one output)", True)
    if self.variance_minimising and self.schedule != "learned_monotone":
      _fail("variance_minimising", "False unless schedule='learned_monotone'", True)
    if self.variance_minimising and self.num_steps != 0:
      _fail("num_steps", "0 (continuous time) with variance_minimising", self.num_steps)

  def _check_time_proposal(self):
    q = self.time_proposal
    if not (isinstance(q, (tuple, list)) and all(_numerics.is_number(p) and 0 < p <= 1 for p in q)
            and (not q or abs(sum(q) - 1.0) <= 1e-3)):
      _fail("time_proposal", "() or a tuple of positive bin probabilities summing to 1", q)
    if q and (self.num_steps or self.variance_minimising):
      _fail("time_proposal", "() with num_steps > 0 or variance_minimising", q)
    total = sum(q)
    object.__setattr__(self, "time_proposal", tuple(float(p) / total for p in q))

  def _check_network(self):
    h, w, _ = self.image_shape
    if not (_numerics.is_int(self.n_embd) and self.n_embd >= 4):
      _fail("n_embd", "an int >= 4", self.n_embd)
    if not (_numerics.is_int(self.n_layer) and self.n_layer >= 0):
      _fail("n_layer", "an int >= 0", self.n_layer)
    if not (_numerics.is_int(self.ensemble_size) and self.ensemble_size >= 1):
      _fail("ensemble_size", "an int >= 1", self.ensemble_size)
    if self.network == "score_unet" and self.n_embd % 32:
      _fail("n_embd", "a multiple of 32 (GroupNorm with 32 groups) for score_unet", self.n_embd)
    if self.network == "unet":
      if not self.channel_mult or not all(_numerics.is_int(m) and m > 0 for m in self.channel_mult):
        _fail("channel_mult", "a non-empty tuple of positive ints", self.channel_mult)
      factor = 2 ** (len(self.channel_mult) - 1)
      if h % factor or w % factor:
        _fail("image_shape", f"H, W divisible by {factor} for {len(self.channel_mult)} levels",
              self.image_shape)
    if self.network == "dit":
      if not (_numerics.is_int(self.patch_size) and self.patch_size > 0) or h % self.patch_size or w % self.patch_size:
        _fail("patch_size", f"a positive divisor of H={h} and W={w}", self.patch_size)
      if not (_numerics.is_int(self.num_heads) and self.num_heads > 0) or self.n_embd % (4 * self.num_heads):
        _fail("n_embd", f"a multiple of 4 * num_heads = {4 * self.num_heads} for dit", self.n_embd)


def _build_network(c):
  network = _build_one_network(c)
  return network if c.ensemble_size == 1 else nets.Ensemble(network, c.ensemble_size)


def _build_one_network(c):
  common = dict(n_embd=c.n_embd, n_layer=c.n_layer, with_fourier_features=c.with_fourier_features,
                fourier_exponents=c.fourier_exponents,
                dropout=c.dropout, gamma_min=c.gamma_min, gamma_max=c.gamma_max,
                num_classes=c.num_classes, dtype=DTYPES[c.dtype])
  common["out_channels"] = c.image_shape[-1] * c.vocab_size if c.grid_logits else 0
  if c.network == "score_unet":
    return nets.ScoreUNet(with_attention=c.with_attention, **common)
  if c.network == "unet":
    return nets.UNet(channel_mult=c.channel_mult, attention_resolutions=c.attention_resolutions,
                     **common)
  return nets.DiT(patch_size=c.patch_size, num_heads=c.num_heads, **common)


def _build_schedule(c):
  ends = dict(gamma_min=c.gamma_min, gamma_max=c.gamma_max)
  if c.schedule == "fixed_linear":
    return nets.FixedSchedule(schedules.fixed_linear(**ends))
  if c.schedule == "cosine":
    return nets.FixedSchedule(schedules.cosine(**ends))
  if c.schedule == "learned_linear":
    return nets.LearnedLinear(**ends)
  if c.schedule == "learned_nnet":
    return nets.LearnedNNet(**ends)
  return nets.LearnedMonotone(**ends)


class VDM:
  """A Variational Diffusion Model: pure functions of a parameter dict (see module doc)."""

  def __init__(self, config: ModelConfig) -> None:
    """Builds the network and schedule modules of `config` (no parameters, no randomness)."""
    if not isinstance(config, ModelConfig):
      raise ValueError(f"VDM expects a ModelConfig, given {type(config).__name__}")
    self.config = config
    self.network = _build_network(config)
    self.schedule = _build_schedule(config)
    self.num_dims = int(np.prod(config.image_shape))

  # Input checks -----------------------------------------------------------------------------

  def check_x(self, x: ArrayLike) -> jax.Array:
    """Validates data x: integer [B, H, W, C] with values in [0, vocab_size); returns it."""
    c, x = self.config, jnp.asarray(x) if not isinstance(x, jax.core.Tracer) else x
    if x.ndim != 4 or tuple(x.shape[1:]) != c.image_shape:
      raise ValueError(f"x must have shape [B, {', '.join(map(str, c.image_shape))}] "
                       f"(image_shape), given shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"x must hold integers in [0, {c.vocab_size}), given dtype {x.dtype}")
    low, high = _numerics.concrete_int_range(x)
    if low is not None and (low < 0 or high >= c.vocab_size):
      raise ValueError(f"x values must lie in [0, vocab_size={c.vocab_size}), given "
                       f"min {low}, max {high}")
    return x

  def check_labels(self, labels: ArrayLike | None, batch: int, *,
                   allow_null: bool = False) -> jax.Array | None:
    """Validates labels: int [B] in [0, num_classes) (or = num_classes if allow_null).

    Returns the labels as an array, or None when labels is None.
    """
    n = self.config.num_classes
    if labels is None:
      return None
    if n == 0:
      raise ValueError("labels were given but ModelConfig.num_classes is 0 (unconditional)")
    labels = jnp.asarray(labels) if not isinstance(labels, jax.core.Tracer) else labels
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"labels must be integers of shape ({batch},), given {labels.dtype} "
                       f"{tuple(labels.shape)}")
    top = n + 1 if allow_null else n
    low, high = _numerics.concrete_int_range(labels)
    if low is not None and (low < 0 or high >= top):
      raise ValueError(f"labels must lie in [0, {top}), given min {low}, max {high}")
    return labels

  # Parameters and the two learned functions -------------------------------------------------

  def init(self, key: PRNGKey, x: ArrayLike, labels: ArrayLike | None = None) -> Params:
    """Parameters {"score_model": ..., "gamma": ...} (float32) for data shaped like x [B, H, W, C].

    With grid_prior, also "grid_prior": zero logits [H, W, C, vocab_size] (the uniform prior).

    labels (int [B] or None) shape the label embedding of class-conditional models.
    """
    x = self.check_x(x)
    labels = self.check_labels(labels, x.shape[0], allow_null=True)
    key_net, key_gamma = jax.random.split(key)
    z = jnp.zeros(x.shape, jnp.float32)
    g = jnp.zeros((x.shape[0],), jnp.float32)
    params = {"score_model": self.network.init(key_net, z, g, None, labels)["params"]}
    gamma = self.schedule.init(key_gamma, g).get("params", {})
    if gamma:
      params["gamma"] = gamma
    if self.config.grid_prior:  # zero logits: the uniform prior of grid_skip alone
      params["grid_prior"] = jnp.zeros(self.config.image_shape + (self.config.vocab_size,))
    return params

  def gamma_fn(self, params: Params) -> GammaFn:
    """The schedule with `params`: t (scalar or [B]) -> gamma(t) = -log SNR(t), float32."""
    variables = {"params": params.get("gamma", {})}
    return lambda t: self.schedule.apply(variables, t)

  def _net(self, params, z_t, gamma_t, labels, conditioning, train=False, key=None):
    c, rngs = self.config, {"dropout": key} if train else None
    out = self.network.apply({"params": params["score_model"]}, z_t, gamma_t, conditioning,
                             labels, train=train, rngs=rngs).astype(jnp.float32)
    if c.grid_logits:  # out [B, H, W, C * V]: channel c's V logits at c * V, ..., c * V + V - 1
      logits = out.reshape(*z_t.shape, c.vocab_size) + params.get("grid_prior", 0.0)
      return decoders.grid_noise_estimate(z_t, gamma_t, c.vocab_size, logits)
    if c.grid_skip:
      out = out + decoders.grid_noise_estimate(z_t, gamma_t, c.vocab_size, params.get("grid_prior"))
    return out

  def eps_fn(self, params: Params, *, labels: ArrayLike | None = None,
             guidance_weight: float | jax.Array = 0.0,
             conditioning: ArrayLike | None = None) -> EpsFn:
    """Deterministic eps_fn(z_t [B, H, W, C], gamma_t scalar or [B]) -> eps_hat (float32).

    With labels and guidance_weight w != 0 (classifier-free guidance):
      eps = (1 + w) eps(z, c) - w eps(z, null).
    labels=None with num_classes > 0 uses the null label (unconditional model).
    conditioning: optional float [B], the reference's conditioning scalar.
    (Ho & Salimans 2022 for the guidance; see vdm_jax.sampling.guidance.)
    """
    if labels is not None:
      labels = self.check_labels(labels, jnp.shape(labels)[0], allow_null=True)
    guided = isinstance(guidance_weight, jax.core.Tracer) or guidance_weight != 0.0
    if guided and labels is None:
      raise ValueError("guidance_weight != 0 needs labels (classifier-free guidance)")
    if guided:
      cond = lambda z, g, y: self._net(params, z, g, y, None if conditioning is None
                                       else jnp.concatenate([conditioning, conditioning]))
      return guidance.classifier_free_guidance(cond, labels, self.config.num_classes,
                                               guidance_weight)
    return lambda z_t, gamma_t: self._net(params, z_t, gamma_t, labels, conditioning)

  # The bound ----------------------------------------------------------------------------------

  def _prepare(self, params, x, labels, conditioning, train, key):
    """Checks inputs, applies label dropout, returns (x, eps_fn of the bound)."""
    c = self.config
    x = self.check_x(x)
    labels = self.check_labels(labels, x.shape[0])
    key_drop, key_label = jax.random.split(key)
    if labels is not None and train and c.label_dropout > 0:
      drop = jax.random.bernoulli(key_label, c.label_dropout, labels.shape)
      labels = jnp.where(drop, c.num_classes, labels)
    if conditioning is not None and jnp.shape(conditioning) != (x.shape[0],):
      raise ValueError(f"conditioning must have shape ({x.shape[0]},), given "
                       f"{jnp.shape(conditioning)}")
    eps_fn = lambda z_t, g_t: self._net(params, z_t, g_t, labels, conditioning, train, key_drop)
    return x, eps_fn

  def _metrics(self, loss, terms):
    metrics = {name: terms[name] for name in ("prior", "reconstruction", "diffusion")}
    metrics["bpd"] = losses.bits_per_dim(loss, self.num_dims)
    return loss, metrics

  def loss(self, params: Params, x: ArrayLike, key: PRNGKey, *, labels: ArrayLike | None = None,
           train: bool = True, conditioning: ArrayLike | None = None) -> tuple[jax.Array, Terms]:
    r"""One-sample estimate of the VDM bound, -log p(x) <= prior + reconstruction + diffusion.

    Draws eps0, t (antithetic if configured) and eps from `key` as vdm_jax.losses.vdm_loss
    does; dropout and label dropout (train=True, probability label_dropout of the null
    label) use keys split from it too. With variance_minimising the schedule's shape gets
    the gradient of E[L_diff^2] (variance_minimising.variance_minimising_vdm_loss). With a
    time_proposal q, t = quantile(q, u) and the diffusion term is divided by q(t): the
    same expectation, with less variance for a q close to sqrt(E[L(t)^2])
    (vdm_jax.time_sampling.vdm_loss).

    Args:
      params: from `init`.
      x: integer data in [0, vocab_size), [B, H, W, C].
      key: PRNG key.
      labels: int [B] in [0, num_classes) or None.
      train: enables dropout and label dropout.
      conditioning: optional float [B], the reference's conditioning scalar.

    Returns:
      (loss [B], metrics): nats per example summed over H, W, C; metrics holds [B] arrays
      "prior", "reconstruction", "diffusion" (nats) and "bpd" (bits per dimension).
    """
    key_noise, key_net = jax.random.split(key)
    x = self.check_x(x)
    t, eps, eps0 = losses.draw_noise(key_noise, x.shape, antithetic=self.config.antithetic)
    if not self.config.time_proposal:
      return self.loss_from_noise(params, x, t, eps, eps0, labels=labels,
                                  conditioning=conditioning, train=train, key=key_net)
    proposal = time_sampling.TimeProposal(jnp.asarray(self.config.time_proposal, jnp.float32))
    x, eps_fn = self._prepare(params, x, labels, conditioning, train, key_net)
    return self._metrics(*time_sampling.vdm_loss_from_noise(
        eps_fn, self.gamma_fn(params), x, time_sampling.quantile(proposal, t), eps, eps0,
        proposal, vocab_size=self.config.vocab_size))

  def loss_from_noise(self, params: Params, x: ArrayLike, t: ArrayLike, eps: ArrayLike,
                      eps0: ArrayLike, *, labels: ArrayLike | None = None,
                      conditioning: ArrayLike | None = None, train: bool = False,
                      key: PRNGKey | None = None) -> tuple[jax.Array, Terms]:
    r"""The bound's terms for given times t [B] and noises eps, eps0 [B, H, W, C].

    Deterministic unless train=True (then `key` drives dropout and label dropout).
    Same value as `loss` with those draws; returns (loss [B], metrics) as `loss` does.
    """
    c = self.config
    if train and key is None:
      raise ValueError("loss_from_noise with train=True needs a key (dropout)")
    key = jax.random.PRNGKey(0) if key is None else key
    x, eps_fn = self._prepare(params, x, labels, conditioning, train, key)
    if c.variance_minimising:
      gamma_0, gamma_1, shape_fn = self._split_schedule(params)
      loss, terms = variance_minimising.variance_minimising_vdm_loss_from_noise(
          eps_fn, gamma_0, gamma_1, shape_fn, x, t, eps, eps0, vocab_size=c.vocab_size)
    else:
      loss, terms = losses.vdm_loss_from_noise(eps_fn, self.gamma_fn(params), x, t, eps, eps0,
                                               num_steps=c.num_steps, vocab_size=c.vocab_size)
    return self._metrics(loss, terms)

  def _split_schedule(self, params):
    """(gamma_0, gamma_1, shape_fn) of the learned_monotone schedule."""
    variables = {"params": params["gamma"]}
    gamma_0, gamma_1 = self.schedule.apply(variables, method="endpoints")
    shape_fn = lambda t: self.schedule.apply(variables, t, method="shape")
    return gamma_0, gamma_1, shape_fn

  # Decoding -----------------------------------------------------------------------------------

  def decode(self, params: Params, z_0: ArrayLike, *, key: PRNGKey | None = None) -> jax.Array:
    """Integers x [B, H, W, C] from the latent z_0: argmax of p(x | z_0), or a sample with key.

    The VDM categorical decoder (vdm_jax.decoders.decode) at gamma_0 = gamma(0); z_0 is
    [B, H, W, C]; the result is int32 in [0, vocab_size).
    """
    gamma_0 = self.gamma_fn(params)(jnp.zeros(()))
    return decoders.decode(z_0, gamma_0, key=key, vocab_size=self.config.vocab_size)
