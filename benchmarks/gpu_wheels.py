"""Which packages travel to the lent GPU machine as wheels (benchmarks/gpu_wheels.sh) and which its image
already holds (benchmarks/gpu_wheels_check.sh installs those into its rehearsal venv).

    python benchmarks/gpu_wheels.py pins [--python 3.12] [EXTRA ...]   # name==version, one per line
    python benchmarks/gpu_wheels.py image                              # the image's packages we rely on

The carried set is the dependency closure of ROOTS as this venv resolved it (read from the installed
metadata, markers evaluated for Linux x86_64 CPython), minus NEVER (torch's world: the machine's CUDA build
stays) and minus IMAGE_HOLDS.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ["diffusers", "transformers", "peft", "pydantic"]
NEVER = {
    "torch",
    "triton",
    "numpy",
    "setuptools",
    "pip",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
}
# Held by the lent H100/H200 image (.library/device/KINDS.md, read 2026-11) at versions the carried set
# accepts: tokenizers 0.23.2 (transformers 5.25 asks >= 0.23.1), safetensors 0.8.0, accelerate 1.15.0; the
# others are asked for with loose lower bounds. hf-xet is never imported offline. Not held, so carried:
# huggingface_hub (the image's 1.33 is below transformers 5.25's 2.4), diffusers, pydantic, kernels, ...
IMAGE_HOLDS = {
    "accelerate", "annotated-doc", "anyio", "certifi", "charset-normalizer", "filelock", "fsspec", "h11",
    "hf-xet", "idna", "markdown-it-py", "mdurl", "packaging", "pillow", "psutil", "pygments", "pyyaml",
    "requests", "rich", "safetensors", "shellingham", "tokenizers", "tqdm", "typer", "urllib3", "zipp",
}  # fmt: skip
# pinned where KINDS.md gives the image's version (the rehearsal installs these); the rest at PyPI's latest
IMAGE_VERSIONS = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2",
                  "safetensors": "0.8.0", "accelerate": "1.15.0"}  # fmt: skip
# also on the image, needed by the package or its tests
IMAGE_EXTRAS = ["tensorboard", "matplotlib", "pytest", "pytest-benchmark", "numpy", "setuptools"]


def _env(python: str) -> dict[str, str]:
    """Marker values of the GPU machine: Linux x86_64 CPython ``python``."""
    return {"python_version": python, "python_full_version": python + ".0", "platform_machine": "x86_64",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip


def closure(python: str, extra: list[str] = ()) -> dict[str, str]:
    """name -> installed version for ROOTS + ``extra`` and everything they require on ``python``."""
    env = _env(python)
    seen: dict[str, str] = {}
    todo = [*ROOTS, *extra]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in NEVER or name.startswith(("nvidia-", "cuda-")):
            continue
        seen[name] = md.version(name)
        for r in md.requires(name) or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


def pins(python: str, extra: list[str] = ()) -> list[str]:
    wanted = {canonicalize_name(e) for e in extra}
    return [
        f"{n}=={v}" for n, v in sorted(closure(python, extra).items()) if n not in IMAGE_HOLDS or n in wanted
    ]


def problems(python: str = "3.12", extra: list[str] = ()) -> list[str]:
    """Requirements of the carried packages that the GPU machine would not meet: those left to the image
    (IMAGE_HOLDS) whose version there (IMAGE_VERSIONS, where known) falls outside them. Empty when the set
    is whole; gpu_wheels.sh refuses to build otherwise."""
    env = _env(python)
    carried = {n: v for n, v in closure(python, extra).items() if n not in IMAGE_HOLDS}
    out = []
    for name in carried:
        for r in map(Requirement, md.requires(name) or []):
            dep = canonicalize_name(r.name)
            if (r.marker is not None and not r.marker.evaluate(env)) or dep in carried or dep in NEVER:
                continue
            if dep in IMAGE_VERSIONS and not r.specifier.contains(IMAGE_VERSIONS[dep], prereleases=True):
                out.append(
                    f"{name} requires {r}; the image holds {IMAGE_VERSIONS[dep]}: take {dep} out of IMAGE_HOLDS"
                )
    return out


def image() -> list[str]:
    names = sorted(IMAGE_HOLDS | set(IMAGE_VERSIONS) | set(IMAGE_EXTRAS))
    return [f"{n}=={IMAGE_VERSIONS[n]}" if n in IMAGE_VERSIONS else n for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pins", help="the carried packages, name==version")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (markers)")
    p.add_argument("extra", nargs="*", help="more packages to carry (with their closure)")
    sub.add_parser("image", help="the image's packages the rehearsal installs")
    args = ap.parse_args()
    if args.cmd == "image":
        print("\n".join(image()))
        return
    bad = problems(args.python, args.extra)
    if bad:
        raise SystemExit("the carried set is not whole:\n  " + "\n  ".join(bad))
    print("\n".join(pins(args.python, args.extra)))


if __name__ == "__main__":
    main()
