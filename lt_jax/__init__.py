"""lt_jax: long-tailed learning in JAX/Flax.

Pure functions on logits and the prior vector (``priors``, ``losses``, ``heads``,
``samplers``, ``metrics``) and one sharded training stack (``lt_jax.train``).
"""

__version__ = "0.1.0"
