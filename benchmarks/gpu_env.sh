# Sourced by benchmarks/gpu_suite.sh (and by gpu_wheels_check.sh, which rehearses it on the CPU): makes the
# machine's python import the package, its kernels and the carried wheels, without touching its torch.
#
#   WHEELS=wheels SITE=/tmp/site REQUIRE_CUDA=1 . benchmarks/gpu_env.sh     # from the repository root
#
# 1. wheels in $WHEELS (made by gpu_wheels.sh, carried by the device tool) install into $SITE, ahead on
#    PYTHONPATH: they shadow the image's older copies and never replace its torch.
# 2. The package installs editable without dependencies; where that fails (no usable setuptools offline)
#    a folder holding only a link to densegrpo_fast/ goes on PYTHONPATH, with kernels/ linked under the
#    package name. Never the checkout itself: its kernels/ would shadow the PyPI `kernels` that
#    transformers >= 5.25 imports. That fallback sets the sourcing shell's EXIT trap (removing the link).
# 3. Each needed package is imported for real, and the requirements of the carried ones are checked
#    against what is importable, so a missing or too old dependency is named before any run starts.
# Returns non-zero when the package or its kernels do not import; prints MISSING lines for the rest.
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET
WHEELS=${WHEELS:-wheels}
SITE=${SITE:-/tmp/site}
# the lent machines document python3 (their venv's); `timeout` needs a `python` program on PATH. A wrapper
# script, not a link: python started through a link outside its venv's bin/ finds no pyvenv.cfg and runs as
# the base interpreter, without the venv's torch. (rm first: `>` onto a link would write through it.)
PY3=$(command -v python3)
mkdir -p /tmp/pybin && rm -f /tmp/pybin/python && printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY3" > /tmp/pybin/python \
  && chmod +x /tmp/pybin/python && export PATH=/tmp/pybin:$PATH  # python = the python3 with torch
prefix() { "$1" -c 'import sys; print(sys.prefix)'; }
[ "$(prefix python)" = "$(prefix "$PY3")" ] || { echo "python on PATH is not $PY3's environment"; return 1; }
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" || echo "installing $WHEELS/ failed"
fi
if [ "${REQUIRE_CUDA:-1}" = 1 ]; then
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || return 1
fi
python -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
if ! python -P -c "import densegrpo_fast.kernels" 2>/dev/null; then
  ln -sfn ../kernels densegrpo_fast/kernels && trap 'rm -f densegrpo_fast/kernels' EXIT
  mkdir -p /tmp/dgf_path && ln -sfn "$PWD/densegrpo_fast" /tmp/dgf_path/densegrpo_fast
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/dgf_path"
fi
python -P -c "import densegrpo_fast.kernels as k; print('kernels from', k.__file__)" || return 1
python -P - <<'PYEOF'
import importlib
import importlib.metadata as md

from packaging.requirements import Requirement

need = {"diffusers": "diffusers", "transformers": "transformers", "peft": "peft", "pydantic": "pydantic",
        "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm", "matplotlib": "matplotlib"}
problems = []
for mod, pkg in need.items():
    try:
        importlib.import_module(mod)
    except Exception as e:  # a version check of transformers raises ImportError, others may raise more
        problems.append(f"{pkg} does not import ({type(e).__name__}: {str(e)[:300]})")
# what the carried packages (and the package itself) require, against what this python resolves
for name in ("densegrpo-fast", "diffusers", "transformers", "peft", "pydantic", "huggingface-hub"):
    try:
        reqs = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    for r in map(Requirement, reqs):
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(r.name)
        except md.PackageNotFoundError:
            problems.append(f"{name} requires {r} and it is not installed")
            continue
        if not r.specifier.contains(have, prereleases=True):
            problems.append(f"{name} requires {r} and {have} is installed")

def version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


print("packages:", ", ".join(f"{p} {version(p)}" for p in [*need.values(), "huggingface-hub", "kernels", "torch"]))
for p in problems:
    print("MISSING", p)
if problems:
    print("the model runs may fail: run `bash benchmarks/gpu_wheels.sh` where pip reaches PyPI and carry "
          "wheels/ (see its header)")
PYEOF
