"""msmoe-jax: communication-efficient Mixture-of-Experts training in JAX."""
