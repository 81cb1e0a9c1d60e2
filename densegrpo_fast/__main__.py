import os
import sys

# `python -m densegrpo_fast` / `torchrun -m densegrpo_fast` in a source checkout (or PYTHONPATH=<checkout>) put
# the checkout on sys.path, where its kernels/ folder (the source of densegrpo_fast.kernels) would shadow the
# PyPI package `kernels`, which transformers (>= 5.25) requires and imports on the way to diffusers' models.
# The installed package does not need the checkout on the path.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]

from densegrpo_fast.cli import main  # noqa: E402

sys.exit(main())
