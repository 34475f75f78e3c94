"""Closed-form oracles for tests, notebooks and benchmarks (not part of the training path).

`gaussian_mixture`: the exact optimal noise predictor of Gaussian and Gaussian-mixture
data, exact samples, and distances between sample sets.
"""
from vdm_jax.testing import gaussian_mixture

__all__ = ["gaussian_mixture"]
