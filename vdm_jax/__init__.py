"""vdm_jax: Variational Diffusion Models (and DDPM as a special case) in JAX/Flax."""
