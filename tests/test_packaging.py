"""The package as users get it: the wheel's layout, the console script, the README's commands."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c for c in readme_commands() if "pytest" in c and "pip install" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    assert "torch==" in test_cmd.split("pip install -e")[0], "torch must be installed before the package"


def test_no_dependency_can_pull_another_torch():
    text = (ROOT / "pyproject.toml").read_text()
    for spec in re.findall(r'"(torch[^"]*)"', text):
        assert not re.search(r"==|<|~=", spec), f"{spec}: torch takes a lower bound only"
    for spec in re.findall(r'"(triton[^"]*)"', text):
        assert not re.search(r"==|<|~=", spec), f"{spec}: CUDA torch pins its own triton"


def test_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "densegrpo_fast", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and re.fullmatch(r"densegrpo-fast \d+\.\d+\.\d+\s*", out.stdout)
    out = subprocess.run([sys.executable, "-m", "densegrpo_fast", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: densegrpo-fast" in out.stdout


def test_wheel_installs_kernels_as_densegrpo_fast_kernels(tmp_path):
    """A built wheel carries kernels/ as densegrpo_fast/kernels/ and no top-level `kernels` package."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("densegrpo_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "densegrpo_fast/kernels/__init__.py" in names
    assert "densegrpo_fast/kernels/sde_step.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    # importable from the wheel alone, outside the source tree
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "-t", str(target), str(wheel)], check=True
    )
    code = "import densegrpo_fast.kernels as k, sys; print(k.__file__); assert 'kernels' not in sys.modules"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def test_repo_root_kernels_folder_is_inert_as_top_level_kernels():
    """From the repository root (``python -m ...``), transformers probes the PyPI name `kernels` by importing
    it and finds our folder: it must stay empty there, or the densegrpo:: ops register twice (a segfault)."""
    code = (
        "import kernels, torch\n"
        "assert not hasattr(kernels, 'sde_step') and not hasattr(kernels, '__version__')\n"
        "from densegrpo_fast.kernels import sde_step, sde_std\n"
        "x = torch.randn(2, 3, 4); s = torch.tensor([0.5, 0.4])\n"
        "print(sde_step(x, x, s, s - 0.1, sde_std(s, 0.7, 0.9), x)[1].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2])" in out.stdout


def test_the_gpu_suite_runs_every_file_that_holds_gpu_tests():
    """gpu_suite.sh names the test files to collect (collecting all would spend its minutes importing): a
    `gpu` test in a file it does not name would never run on the lent GPU."""
    suite = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    marked = re.compile(r"^(@pytest\.mark\.gpu\b|pytestmark = .*\bpytest\.mark\.gpu\b)", re.M)
    holders = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if marked.search(p.read_text())]
    assert holders and [n for n in holders if f"tests/{n}" not in suite] == []
