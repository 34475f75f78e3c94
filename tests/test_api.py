"""The curated public API: the stable names of DESIGN.md exist with their signatures."""
import inspect
import subprocess
import sys

import vdm_jax

STABLE_SIGNATURES = {
    "schedules.fixed_linear": "(gamma_min=-13.3, gamma_max=5.0)",
    "schedules.alpha_sigma": "(gamma)",
    "gaussian.forward_marginal": "(f, gamma)",
    "gaussian.transition": "(gamma_s, gamma_t)",
    "gaussian.posterior": "(z_t, f, gamma_s, gamma_t)",
    "gaussian.kl_normal": "(mean_q, var_q, mean_p, var_p)",
    "decoders.encode": "(x, vocab_size=256)",
    "decoders.categorical_logprobs": "(z_0, gamma_0, vocab_size=256)",
    "losses.prior_loss": "(f, gamma_1)",
    "losses.reconstruction_loss": "(x, z_0, gamma_0, vocab_size=256)",
    "losses.diffusion_loss": "(eps, eps_hat, dgamma_dt)",
    "losses.discrete_diffusion_loss": "(eps, eps_hat, gamma_t, gamma_s, num_steps)",
    "losses.vdm_loss": "(eps_fn, gamma_fn, x, key, *, num_steps=0, antithetic=True, vocab_size=256",
    "losses.bits_per_dim": "(nats, num_dims)",
    "sampling.ancestral_sample": "(eps_fn, gamma_fn, key, shape, *, num_steps=1000",
    "sampling.ddim_sample": "(eps_fn, gamma_fn, key, shape, *, num_steps=50, eta=0.0",
    "sampling.ode_sample": "(eps_fn, gamma_fn, key, shape, *, num_steps=25, solver='dpm_solver_2m'",
}


def _without_annotations(function):
  """The signature's names, order, kinds and defaults; the type hints are checked elsewhere."""
  signature = inspect.signature(function)
  parameters = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
  return str(signature.replace(parameters=parameters, return_annotation=signature.empty))


def test_stable_names_keep_their_leading_arguments():
  for dotted, expected in STABLE_SIGNATURES.items():
    module, name = dotted.split(".")
    signature = _without_annotations(getattr(getattr(vdm_jax, module), name))
    assert signature.startswith(expected), (dotted, signature)


def test_everything_in_all_exists():
  missing = [name for name in vdm_jax.__all__ if not hasattr(vdm_jax, name)]
  assert not missing


def test_importing_the_package_imports_neither_tensorflow_nor_flax():
  code = "import sys, vdm_jax; print('tensorflow' in sys.modules, 'flax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "False"]
