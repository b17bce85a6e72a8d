"""intellect-jax: DiLoCo training of Llama-3 models across islands, in JAX."""

__version__ = "0.1.0"
