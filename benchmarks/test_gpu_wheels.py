"""The wheels that travel to the lent GPU machine (benchmarks/gpu_wheels.py), checked against this venv."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("gpu_wheels", Path(__file__).with_name("gpu_wheels.py"))
gw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gw)


def test_the_carried_set():
    """(Whether the image meets the carried set's requirements, ``gw.problems()``, depends on what PyPI
    released last; gpu_wheels.sh refuses to build when it does not, and CI does not fail on it.)"""
    pins = dict(p.split("==") for p in gw.pins("3.12"))
    assert {"diffusers", "transformers", "peft", "pydantic"} <= pins.keys()
    assert not pins.keys() & gw.IMAGE_HOLDS  # the image's copies are used
    for name, version in pins.items():  # each at this venv's version, with what it asks for that is not held
        assert gw.md.version(name) == version
        for r in map(gw.Requirement, gw.md.requires(name) or []):
            dep = gw.canonicalize_name(r.name)
            if r.marker is None or r.marker.evaluate(gw._env("3.12")):
                assert dep in pins or dep in gw.IMAGE_HOLDS or dep in gw.NEVER, (name, str(r))


def test_a_requirement_the_image_does_not_meet_is_named(monkeypatch):
    """Had huggingface_hub been left to the image (1.33), the check names it wherever a carried package asks
    for more (transformers >= 5.25 asks >= 2.4: what the tenth session's hand-written list missed)."""
    monkeypatch.setattr(gw, "IMAGE_HOLDS", gw.IMAGE_HOLDS | {"huggingface-hub"})
    carried = [n for n in gw.closure("3.12") if n not in gw.IMAGE_HOLDS]
    asks = [n for n in carried for r in map(gw.Requirement, gw.md.requires(n) or [])
            if gw.canonicalize_name(r.name) == "huggingface-hub" and not r.specifier.contains("1.33.0")]  # fmt: skip
    bad = gw.problems()
    if not asks:
        pytest.skip("this venv's carried packages ask no more than the image's hub 1.33")
    assert sorted(b.split()[0] for b in bad if "huggingface-hub" in b and "1.33.0" in b) == sorted(set(asks))
