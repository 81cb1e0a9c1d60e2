"""The embedded toy world: a GenEval in miniature that runs on a laptop CPU.

- :mod:`~densegrpo_fast.toy.world`: vocabulary, prompts with requirements, the held-out split, the renderer.
- :mod:`~densegrpo_fast.toy.detector`: the weight-free detector reward (``ToyGenEvalReward``).
- :mod:`~densegrpo_fast.toy.pretrain` / :mod:`~densegrpo_fast.toy.evaluate`: the ``pretrain-toy`` and
  ``eval`` commands. The model itself is the policy adapter :mod:`densegrpo_fast.policies.toy`.

See ``README.md`` beside this file for the measured behaviour of each piece.
"""
