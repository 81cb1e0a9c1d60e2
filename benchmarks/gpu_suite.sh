#!/usr/bin/env bash
# Everything GPU-side in one call: the `gpu` tests (compiled Triton, CUDA graphs, inductor), the kernel
# benchmarks, and a table of this run appended to benchmarks/RESULTS.md with the card's name.
#
#   bash benchmarks/gpu_suite.sh            # on a machine with a CUDA GPU, from the repository root
#
# It uses the python on PATH (torch, triton must be there); it installs the package without
# dependencies so that the machine's CUDA torch is kept. Results also land in $OUT when that is set
# (the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
if ! python -c "import densegrpo_fast.kernels" 2>/dev/null; then
  # no usable setuptools offline: expose kernels/ under the package name for this run only
  ln -sfn ../kernels densegrpo_fast/kernels && trap 'rm -f densegrpo_fast/kernels' EXIT
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import densegrpo_fast.kernels as k; print('kernels from', k.__file__)" || exit 1
python -m pip install -q --no-deps pytest-benchmark 2>/dev/null || true
CSV=benchmarks/results.csv
before=$( [ -f "$CSV" ] && wc -l < "$CSV" || echo 0 )
status=0
python -m pytest -q -m gpu tests/ 2>&1 | tee /tmp/gpu_tests.log || status=1
python -m pytest -q benchmarks/ --benchmark-columns=mean,rounds -p no:cacheprovider 2>&1 | tee /tmp/gpu_bench.log || status=1
python benchmarks/report.py --csv "$CSV" --skip "$before" --tests-log /tmp/gpu_tests.log >> benchmarks/RESULTS.md
if [ -n "${OUT:-}" ]; then cp benchmarks/RESULTS.md "$CSV" /tmp/gpu_tests.log /tmp/gpu_bench.log "$OUT"/ 2>/dev/null; fi
exit $status
