"""Tests of vdm_jax.sampling / vdm_jax.ode against closed forms and the reference fixture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from vdm_jax import gaussian

from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax.testing import gaussian_mixture
from seeding import seed_of

GAMMA_FN = schedules.fixed_linear(-13.3, 5.0)
MU, STD, DIM, NUM = 0.3, 0.5, 2, 6000


rng = np.random.default_rng(0)  # reseeded per test by _seed_per_test


@pytest.fixture(autouse=True)
def _seed_per_test(request):
  """Every test draws from its own fixed seed (seeding.seed_of), whatever ran before it."""
  global rng
  rng = np.random.default_rng(seed_of(request))


def _fresh_key():
  return jax.random.PRNGKey(rng.integers(2**31))


def _moments(gamma):
  """alpha, sigma^2, and the variance v = alpha^2 STD^2 + sigma^2 of q(z_t) for Gaussian data."""
  gamma = np.float64(gamma)
  alpha2, sigma2 = 1 / (1 + np.exp(gamma)), 1 / (1 + np.exp(-gamma))
  return np.sqrt(alpha2), sigma2, alpha2 * STD**2 + sigma2


def _gamma(t):
  return -13.3 + 18.3 * np.asarray(t, np.float64)  # GAMMA_FN in float64


def _abar(gamma):
  return 1.0 / (1.0 + np.exp(gamma))  # alpha^2 = sigmoid(-gamma)


def _eps(z, gamma, mu, std):
  """The optimal eps_hat for x ~ N(mu, std^2): sigma (z - alpha mu) / (alpha^2 std^2 + sigma^2)."""
  a2 = _abar(gamma)
  return np.sqrt(1 - a2) * (z - np.sqrt(a2) * mu) / (a2 * std**2 + 1 - a2)


def _flow_map(solver, num_steps, mu, std):
  """(B, A) of the scheme's map z_0 = A z_1 + B (affine: so is eps_hat), from z_1 = 0 and 1.

  DDIM (eta = 0) / Euler and Heun in sigmabar, DPM-Solver++(2M) in lambda (Lu et al. 2022b).
  """
  z, g = np.array([0.0, 1.0]), _gamma(np.arange(num_steps, -1, -1) / num_steps)
  ddim = lambda z, e, i: (np.sqrt(_abar(g[i + 1]) / _abar(g[i])) * z
                          - np.sqrt(1 - _abar(g[i + 1])) * np.expm1((g[i] - g[i + 1]) / 2) * e)
  x0_prev = h_prev = None
  for i in range(num_steps):
    eps = _eps(z, g[i], mu, std)
    if solver == "dpm_solver_2m":
      x0, h = (z - np.sqrt(1 - _abar(g[i])) * eps) / np.sqrt(_abar(g[i])), (g[i] - g[i + 1]) / 2
      d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
      z = (np.sqrt((1 - _abar(g[i + 1])) / (1 - _abar(g[i]))) * z
           - np.sqrt(_abar(g[i + 1])) * np.expm1(-h) * d)
      x0_prev, h_prev = x0, h
    elif solver == "heun":
      z = ddim(z, 0.5 * (eps + _eps(ddim(z, eps, i), g[i + 1], mu, std)), i)
    else:
      z = ddim(z, eps, i)
  return z[0], z[1] - z[0]


def _rice_mean(offset2, var):
  """E||X|| for X ~ N(m, var I_2), ||m||^2 = offset2 (the Rice distribution's mean)."""
  x = -offset2 / (2 * var)
  laguerre = np.exp(x / 2) * ((1 - x) * special.i0(-x / 2) - x * special.i1(-x / 2))
  return np.sqrt(var * np.pi / 2) * laguerre


def _stochastic_moments(num_steps, mu, std, snr=None, stop=None):
  """(mean, var) of ancestral sampling (posterior variance), followed at each s by one Langevin
  step of target snr when given, propagated exactly: each step is z <- a z + b + c noise.
  With `stop`, the moments after the first `stop` of the num_steps steps.

  The Langevin step size 2 (snr ||noise|| / ||score||)^2 uses batch means of the norms; over
  NUM = 6000 examples they are their expectations (sqrt(pi / 2) for the noise in 2-D, the Rice
  mean of (z - alpha mu) / v for the score) to 1 %, which moves the variance by < 1e-3.
  """
  mean, var, g = 0.0, 1.0, _gamma(np.arange(num_steps, -1, -1) / num_steps)
  for i in range(num_steps if stop is None else stop):
    c = -np.expm1(g[i + 1] - g[i])
    step = lambda z: np.sqrt(_abar(g[i + 1]) / _abar(g[i])) * (  # noqa: B023
        z - np.sqrt(1 - _abar(g[i])) * c * _eps(z, g[i], mu, std))  # noqa: B023
    a, b = step(1.0) - step(0.0), step(0.0)
    mean, var = a * mean + b, a * a * var + c * (1 - _abar(g[i + 1]))
    if snr is not None:
      a2 = _abar(g[i + 1])
      v = a2 * std**2 + 1 - a2
      ratio = np.sqrt(np.pi / 2) * v / _rice_mean(DIM * (mean - np.sqrt(a2) * mu) ** 2, var)
      eta = 2 * (snr * ratio) ** 2 / v  # step / v: z <- z - eta (z - alpha mu) + sqrt(2 step) n
      mean, var = (1 - eta) * mean + eta * np.sqrt(a2) * mu, (1 - eta) ** 2 * var + 2 * eta * v
  return mean, var


def _scheme_moments(name, mu, std):
  """Exact (mean, var) per dimension of what sampler `name` returns for x ~ N(mu, std^2):
  the distribution of its discretised scheme (with z_1 ~ N(0, I)), not of the true q(z_0)."""
  if name in ("ancestral_1000", "pc_1000"):
    return _stochastic_moments(1000, mu, std, 0.16 if name == "pc_1000" else None)
  solver, num_steps = {"ddim_50": ("euler", 50), "dpm_solver_2m_25": ("dpm_solver_2m", 25),
                       "heun_25": ("heun", 25)}[name]
  b, a = _flow_map(solver, num_steps, mu, std)
  return b, a * a


# name -> the sampler at its default step count. Their schemes' exact output variances for
# this Gaussian differ from q(z_0)'s by -0.9 % (ancestral), -8.7 % (DDIM), +1.6 % (DPM-Solver
# ++(2M)), +3.7 % (Heun) and +2.6 % (PC: Langevin at snr r inflates by 1 / (1 - r^2)); the
# samples are compared with those exact moments, so only sampling error is allowed.
SAMPLERS = {
    "ancestral_1000": lambda e, k, s: sampling.ancestral_sample(e, GAMMA_FN, k, s),
    "ddim_50": lambda e, k, s: sampling.ddim_sample(e, GAMMA_FN, k, s),
    "dpm_solver_2m_25": lambda e, k, s: sampling.ode_sample(e, GAMMA_FN, k, s),
    "heun_25": lambda e, k, s: sampling.ode_sample(e, GAMMA_FN, k, s, solver="heun"),
    "pc_1000": lambda e, k, s: sampling.pc_sample(e, GAMMA_FN, k, s),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_matches_the_exact_gaussian_moments_of_its_scheme(name):
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  z = np.asarray(jax.jit(lambda k: SAMPLERS[name](eps_fn, k, (NUM, DIM)))(_fresh_key()),
                 np.float64)
  mean, var = _scheme_moments(name, MU, STD)
  n = z.size  # 4 standard errors of the mean and of the variance (Gaussian: 2 var^2 / n)
  assert abs(z.mean() - mean) < 4 * np.sqrt(var / n)
  assert abs(z.var() / var - 1) < 4 * np.sqrt(2 / n)


def _total_variation_to_the_prior(means, stds, weights):
  """TV(q(z_1), N(0, I)) for the 2-D mixture, by quadrature on a 0.01 grid over [-7, 7]^2."""
  u = np.linspace(-7.0, 7.0, 1401)
  x, y = np.meshgrid(u, u, indexing="ij")
  a2 = _abar(_gamma(1.0))
  q = sum(w * np.exp(-((x - np.sqrt(a2) * m[0]) ** 2 + (y - np.sqrt(a2) * m[1]) ** 2)
                     / (2 * (a2 * s**2 + 1 - a2))) / (2 * np.pi * (a2 * s**2 + 1 - a2))
          for m, s, w in zip(means, stds, weights, strict=True))
  prior = np.exp(-(x**2 + y**2) / 2) / (2 * np.pi)
  return 0.5 * np.sum(np.abs(q - prior)) * (u[1] - u[0]) ** 2


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_reproduces_mixture_component_weights(name):
  means, stds, weights = np.array([[-1.0, 0.5], [1.0, -0.5]]), np.array([0.3, 0.2]), np.array([0.3, 0.7])
  eps_fn = gaussian_mixture.mixture_eps_fn(means, stds, weights)
  z = np.asarray(jax.jit(lambda k: SAMPLERS[name](eps_fn, k, (NUM, 2)))(_fresh_key()))
  left = z[:, 0] < 0
  # The exact reverse process maps q(z_1) to q(z_0); a map or Markov kernel changes the
  # probability of any set by at most the total variation between its inputs (data processing),
  # so starting from N(0, I) moves at most TV(q(z_1), N(0, I)) = 0.015 of mass across x = 0.
  # (The components lie 3.3 and 5 stds from the boundary: discretisation moves ~no mass.)
  tv = _total_variation_to_the_prior(means, stds, weights)
  assert abs(left.mean() - weights[0]) < 4 * np.sqrt(weights[0] * weights[1] / NUM) + tv
  # Each component keeps its own spread (per-axis std): 4 standard errors (1 / sqrt(2 n) of
  # it) plus the scheme's discretisation error on a Gaussian of that std (exact, above).
  for component, mask in ((0, left), (1, ~left)):
    std = np.sqrt(_scheme_moments(name, 0.0, stds[component])[1])
    allowance = 4 / np.sqrt(2 * mask.sum()) + abs(std / stds[component] - 1)
    np.testing.assert_allclose(z[mask].std(0), stds[component], rtol=allowance)


def test_ancestral_step_with_true_noise_and_zero_noise_is_the_posterior_mean():
  key_f, key_eps, key_t = jax.random.split(_fresh_key(), 3)
  f = jax.random.uniform(key_f, (3, 4, 4, 2), minval=-1, maxval=1)
  eps = jax.random.normal(key_eps, f.shape)
  t, s = sorted(np.asarray(jax.random.uniform(key_t, (2,))), reverse=True)
  for gamma_fn in (schedules.fixed_linear(), schedules.cosine()):
    _check_step_is_posterior_mean(gamma_fn, f, eps, t, s)


def _check_step_is_posterior_mean(gamma_fn, f, eps, t, s):
  @jax.jit
  def step_and_posterior(f, eps):
    gamma_t = gamma_fn(jnp.full((3,), t))
    z_t = gaussian.sample_forward(f, gamma_t, eps)
    z_s = sampling.ancestral_step(lambda z, g: eps, gamma_fn, z_t, t, s, jnp.zeros_like(f))
    ones = sampling.ancestral_step(lambda z, g: eps, gamma_fn, z_t, t, s, jnp.ones_like(f))
    mean, var = gaussian.posterior(z_t, f, gamma_fn(jnp.full((3,), s)), gamma_t)
    return z_s, ones, mean, jnp.broadcast_to(jnp.sqrt(var), f.shape)

  z_s, ones, mean, std = step_and_posterior(f, eps)
  np.testing.assert_allclose(z_s, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ones - z_s, std, rtol=1e-4)


def test_ancestral_step_matches_the_reference_sample_step(reference_dir):
  inputs = np.load(reference_dir / "inputs.npz")
  out = np.load(reference_dir / "outputs_fixed.npz")
  num_steps, i = int(inputs["sample_T"]), int(inputs["sample_i"])
  t, s = sampling.time_grid(num_steps)[i], sampling.time_grid(num_steps)[i + 1]
  assert float(t) == float(out["sample_t"]) and float(s) == float(out["sample_s"])
  seen = []

  def eps_fn(z, gamma):
    seen.append(gamma)
    return jnp.asarray(out["sample_eps_hat"])

  z_s = sampling.ancestral_step(eps_fn, schedules.fixed_linear(-13.3, 5.0), jnp.asarray(inputs["sample_z_t"]),
                                t, s, jnp.asarray(out["sample_noise"]))
  np.testing.assert_allclose(seen[0], np.full(4, out["sample_g_t"]), rtol=1e-6)
  np.testing.assert_allclose(z_s, out["sample_z_s"], atol=1e-5)


def test_ancestral_step_on_a_beta_schedule_is_ddpm_algorithm_2():
  num_steps = 20
  betas = np.asarray(schedules.ddpm_betas("linear", num_steps, beta_start=1e-3, beta_end=0.2))
  gamma_fn = schedules.from_betas(betas)
  abar = np.cumprod(1 - betas)
  key_z, key_e, key_n = jax.random.split(_fresh_key(), 3)
  x_t, eps, noise = (jax.random.normal(k, (2, 3, 3, 1)) for k in (key_z, key_e, key_n))
  for i in (2, 9, 20):  # DDPM step i: x_i -> x_{i-1}, t = i / T (i = 1 ends at the bridge's gamma(0))
    expected = (x_t - betas[i - 1] / np.sqrt(1 - abar[i - 1]) * eps) / np.sqrt(1 - betas[i - 1])
    expected = expected + np.sqrt(betas[i - 1]) * noise
    got = sampling.ancestral_step(lambda z, g: eps, gamma_fn, x_t, i / num_steps, (i - 1) / num_steps, noise,
                                  variance="transition")
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def test_ddim_with_eta_one_is_the_ancestral_step():
  keys = jax.random.split(_fresh_key(), 3)
  z_t, eps_hat, noise = (jax.random.normal(k, (4, 5)) for k in keys)
  g_t, g_s = GAMMA_FN(jnp.full((4,), 0.6)), GAMMA_FN(jnp.full((4,), 0.55))
  anc = sampling.ancestral_step(lambda z, g: eps_hat, GAMMA_FN, z_t, 0.6, 0.55, noise)
  np.testing.assert_allclose(sampling.ddim_step(z_t, eps_hat, g_t, g_s, noise, eta=1.0), anc, rtol=1e-5, atol=1e-6)


def test_ddim_with_eta_zero_is_deterministic_and_ignores_step_noise():
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  key = _fresh_key()
  sample = jax.jit(lambda k, eta: sampling.ddim_sample(eps_fn, GAMMA_FN, k, (16, DIM), num_steps=20, eta=eta))
  a, b = sample(key, 0.0), sample(key, 0.0)
  z_1 = jax.random.normal(jax.random.split(key)[0], (16, DIM))
  c = sampling.ddim_decode(eps_fn, GAMMA_FN, z_1, num_steps=20)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
  d = sample(key, 0.5)
  assert np.abs(np.asarray(d - a)).max() > 1e-3


@pytest.mark.parametrize("solver, num_steps, atol", [("euler", 200, 0.06), ("dpm_solver_2m", 50, 1e-3)])
def test_ddim_encode_then_decode_returns_the_input(solver, num_steps, atol):
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  a0, _, v0 = _moments(GAMMA_FN(0.0))
  z_0 = a0 * MU + np.sqrt(v0) * jax.random.normal(_fresh_key(), (64, DIM))
  z_1 = sampling.ddim_encode(eps_fn, GAMMA_FN, z_0, num_steps=num_steps, solver=solver)
  back = sampling.ddim_decode(eps_fn, GAMMA_FN, z_1, num_steps=num_steps, solver=solver)
  assert np.asarray(z_1).std() > 0.8  # it really went to noise (std of q(z_1) is ~1)
  np.testing.assert_allclose(back, z_0, atol=atol)  # stated errors: DDIM is O(1/N), DPM-Solver++ O(1/N^2)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("dpm_solver_2m", 2), ("heun", 2)])
def test_ode_solver_converges_to_the_exact_flow_at_its_order(solver, order):
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  z_1 = jax.random.normal(_fresh_key(), (64, DIM))
  a0, _, v0 = _moments(GAMMA_FN(0.0))
  a1, _, v1 = _moments(GAMMA_FN(1.0))
  exact = a0 * MU + np.sqrt(v0 / v1) * (np.asarray(z_1, np.float64) - a1 * MU)
  errors = [np.abs(sampling.ode_solve(eps_fn, GAMMA_FN, z_1, sampling.time_grid(n), solver=solver) - exact).max()
            for n in (40, 80)]
  assert errors[1] / errors[0] < 0.5**order * 1.3


def test_ancestral_sample_keeps_x0_predictions_at_chosen_steps():
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  z_0, x0 = sampling.ancestral_sample(eps_fn, GAMMA_FN, _fresh_key(), (4000, DIM), num_steps=100,
                                      x0_steps=[0, 50, 99])
  assert x0.shape == (3, 4000, DIM)
  n = x0[0].size
  # x0_hat = E[x | z_t] = MU + alpha_t STD^2 (z_t - alpha_t MU) / v_t, affine in z_t, whose
  # mean and variance at the start of step i are those of the first i steps of the scheme.
  for row, step in ((0, 0), (1, 50)):
    mean_z, var_z = _stochastic_moments(100, MU, STD, stop=step)
    a_t, _, v_t = _moments(_gamma(1 - step / 100))
    mean = MU + a_t * STD**2 * (mean_z - a_t * MU) / v_t
    std = a_t * STD**2 * np.sqrt(var_z) / v_t
    assert abs(float(x0[row].mean()) - mean) < 4 * std / np.sqrt(n)
    assert abs(float(x0[row].std()) / std - 1) < 4 / np.sqrt(2 * n)
  # The last step (t = 0.01 -> 0) returns z_0 = alpha_0 (c x0_hat + (1 - c) z_t / alpha_t) +
  # sqrt(c) sigma_0 noise, so z_0 / alpha_0 - x0_hat = (1 - c) sigma_t eps_hat / alpha_t (< 2e-5
  # here) + sqrt(c) sigma_0 / alpha_0 noise: within 6 of that noise's standard deviations.
  a_0, sigma2_0, _ = _moments(_gamma(0.0))
  c = -np.expm1(_gamma(0.0) - _gamma(0.01))
  np.testing.assert_allclose(x0[2], z_0 / a_0, atol=6 * np.sqrt(c * sigma2_0) / a_0 + 2e-5)


def test_to_data_decodes_a_noiseless_latent_to_the_integers():
  x = jax.random.randint(_fresh_key(), (2, 4, 4, 3), 0, 256)
  f = 2 * (x + 0.5) / 256 - 1
  z_0 = gaussian.forward_marginal(f, GAMMA_FN(0.0))[0]
  np.testing.assert_array_equal(jax.jit(lambda z: sampling.to_data(z, GAMMA_FN))(z_0), x)


def test_bad_options_raise_value_error():
  eps_fn = gaussian_mixture.gaussian_eps_fn(MU, STD, DIM)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="solver"):
    sampling.ode_sample(eps_fn, GAMMA_FN, key, (2, 2), solver="rk45")
  with pytest.raises(ValueError, match="num_steps"):
    sampling.ancestral_sample(eps_fn, GAMMA_FN, key, (2, 2), num_steps=0)
  with pytest.raises(ValueError, match="shape"):
    sampling.ddim_sample(eps_fn, GAMMA_FN, key, (2,))
  with pytest.raises(ValueError, match="variance"):
    sampling.ancestral_sample(eps_fn, GAMMA_FN, key, (2, 2), variance="large")
  with pytest.raises(ValueError, match="monotone"):
    sampling.ddim_sample(eps_fn, GAMMA_FN, key, (2, 2), times=[1.0, 0.2, 0.5, 0.0])
