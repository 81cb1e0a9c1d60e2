#!/usr/bin/env bash
# Wheels of the Python packages that benchmarks/gpu_suite.sh needs and a GPU machine without network lacks,
# for that machine's Python (CPython 3.12, manylinux x86_64), at the versions installed in this venv (the
# ones CI tests). gpu_suite.sh installs whatever lies in wheels/ into /tmp/site, ahead on PYTHONPATH.
#
#   bash benchmarks/gpu_wheels.sh [EXTRA_PACKAGE ...]    # here, where pip reaches PyPI; writes wheels/
#
# What is carried: benchmarks/gpu_wheels.py decides: the dependency closure of diffusers, transformers, peft
# and pydantic as this venv resolved it, minus torch's world and minus the packages the lent H100/H200 image
# holds at versions the carried set accepts. The image holds transformers 5.17 and huggingface_hub 1.33, and
# transformers >= 5.25 refuses to import beside a hub < 2.4 (and needs the PyPI package `kernels`): carrying
# transformers alone would fail at import there, so the closure, not a hand list, decides.
#
# Size: the device tool carries at most 64 MiB with the tree (about 35 MB): the whole closure is 47 MB, the
# carried set 28 MB (18 wheels, 2026-12-03). Check a new set on the CPU first: benchmarks/gpu_wheels_check.sh installs it the
# way gpu_suite.sh does over a venv with the image's older versions and runs the model tests.
#
# PY_VERSION (default 3.12) picks the wheels' Python; the check uses this machine's (3.11).
# wheels/ is gitignored; the device tool carries it: run(command="bash benchmarks/gpu_suite.sh",
# carry=["wheels"], timeout_s=600). Run it with the project's venv active (it pins the versions installed
# there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${WHEELS_DIR:-wheels}
mapfile -t pins < <("$PY" benchmarks/gpu_wheels.py pins --python "$PY_VERSION" "$@")
(( ${#pins[@]} > 0 )) || { echo "no packages to carry (benchmarks/gpu_wheels.py failed?)" >&2; exit 1; }
echo "carrying ${#pins[@]} packages: ${pins[*]}"
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}" \
  2> >(grep -v "^WARNING: Location" >&2)
got=$(ls "$DEST"/*.whl | wc -l)
(( got == ${#pins[@]} )) || { echo "expected ${#pins[@]} wheels in $DEST, got $got" >&2; exit 1; }
echo "$got wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
# The device tool carries the working tree and wheels/ together, 64 MiB at most: check the sum now, not there.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
wheels=$(du -sb "$DEST" | cut -f1)
total=$(( (tree + wheels) / 1048576 ))
echo "the tree ($(( tree / 1048576 )) MiB) and $DEST ($(( wheels / 1048576 )) MiB) make ${total} MiB of the device tool's 64"
(( total < 64 )) || { echo "over the device tool's 64 MiB: remove large untracked or committed files first" >&2; exit 1; }
