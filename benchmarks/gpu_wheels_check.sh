#!/usr/bin/env bash
# A rehearsal, on this CPU machine, of how benchmarks/gpu_suite.sh sets up the lent GPU machine: a venv
# holding the image's packages (benchmarks/gpu_wheels.py image: transformers 5.17, huggingface_hub 1.33,
# tokenizers 0.23.2, accelerate 1.15 as KINDS.md lists them; no diffusers, pydantic nor kernels), the
# wheels gpu_wheels.sh picks (built for this machine's Python), installed by benchmarks/gpu_env.sh exactly
# as the suite does, then the real-model tests. A dependency the carried set misses fails here, for free,
# instead of in the GPU lease.
#
#   bash benchmarks/gpu_wheels_check.sh     # about 3 minutes, most of it pip; needs PyPI
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${CHECK_VENV:-/tmp/gpu_image_venv}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}  # the project's venv
PYV=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ -x "$ENV/bin/python" ] || { python3 -m venv "$ENV" && "$ENV/bin/pip" install -q torch==2.13.0; }
mapfile -t image < <("$PY" benchmarks/gpu_wheels.py image)
"$ENV/bin/pip" install -q "${image[@]}" 2> >(grep -v "^WARNING: Location" >&2)
for p in diffusers pydantic kernels; do  # not on the image: only the carried wheels may provide them
  "$ENV/bin/pip" uninstall -q -y "$p" 2>/dev/null || true
done
PY_VERSION=$PYV WHEELS_DIR=/tmp/gpu_check_wheels bash benchmarks/gpu_wheels.sh
export PATH="$ENV/bin:$PATH"
rm -rf /tmp/gpu_check_site
set +eu
WHEELS=/tmp/gpu_check_wheels SITE=/tmp/gpu_check_site REQUIRE_CUDA=0 . benchmarks/gpu_env.sh > /tmp/gpu_check_env.log 2>&1
rc=$?
set -eu
cat /tmp/gpu_check_env.log
(( rc == 0 )) || { echo "gpu_env.sh failed (rc $rc)" >&2; exit 1; }
if grep -q "^MISSING" /tmp/gpu_check_env.log; then echo "gpu_env.sh reports missing packages" >&2; exit 1; fi
python -P -m pytest -q -p no:cacheprovider tests/test_policy_sd3.py tests/test_policy_flux.py tests/test_real_model_bench.py
