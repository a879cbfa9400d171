"""ascl_jax: Adaptive Soft Contrastive Learning (ASCL) in JAX and Flax."""

__version__ = "0.1.0"
