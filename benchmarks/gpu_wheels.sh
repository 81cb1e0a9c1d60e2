#!/usr/bin/env bash
# Wheels of the Python packages that benchmarks/gpu_suite.sh needs and a GPU machine without network may
# lack, for that machine's Python (CPython 3.12, manylinux x86_64), at the versions installed here (the
# ones CI tests). gpu_suite.sh installs whatever lies in wheels/ into /tmp/site before anything else.
#
#   bash benchmarks/gpu_wheels.sh [EXTRA_PACKAGE ...]    # here, where pip reaches PyPI; writes wheels/
#
# Default set: diffusers and pydantic (with pydantic-core, annotated-types, typing-inspection and the
# typing-extensions pydantic asks for), which the lent H100/H200 image did not list; peft (listed there at
# an unknown version; the trainer's LoRA); and transformers with the regex it needs, since the image holds
# transformers 5.17 and the tests run here on this venv's (the tiny models' tokenizers are built through
# its constructors). torch, triton, tokenizers, safetensors, pyyaml, numpy, tqdm, matplotlib and
# tensorboard are on that image.
#
# wheels/ is gitignored; the device tool carries it: run(command="bash benchmarks/gpu_suite.sh",
# carry=["wheels"], timeout_s=600). Run it with the project's venv active (it pins the versions installed
# there); pip fetches the cp312 wheels from the package index (checked 2026-12-03: 9 wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
pkgs=(diffusers peft transformers regex pydantic pydantic-core annotated-types typing-inspection typing-extensions "$@")
mapfile -t pins < <("$PY" - "${pkgs[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    print(f"{name}=={md.version(name)}")
EOF
)
rm -rf wheels && mkdir wheels
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheels "${pins[@]}"
ls -l wheels && du -sh wheels
