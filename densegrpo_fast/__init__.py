"""densegrpo-fast: DenseGRPO for flow-matching text-to-image models.

The kernels live in :mod:`densegrpo_fast.kernels` (torch + triton only); the engine, trainer and toy
world build on them. See the README and densegrpo_fast/ALGORITHM.md for the math and its conventions.
"""

__version__ = "0.1.0"
