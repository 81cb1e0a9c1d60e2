"""Compile every Triton launch the ops make for an NVIDIA GPU this machine need not have, and read the SASS.

The CPU tests run the kernels under Triton's interpreter: that checks their arithmetic, not that they
compile, nor how. Register use, spills to local memory, and whether the latent moves in 128-bit accesses
(what a bandwidth-bound kernel needs to come near the copy bandwidth) only show in the compiled code.
Triton compiles for any NVIDIA target without a GPU (its wheel carries LLVM, ptxas and cuobjdump), so
this script calls the public ops on CPU tensors at the real shapes with a stand-in driver that names the
target. Triton's ``jit_cache_hook`` catches each launch before it would run; the script compiles it with
the launch's own specialisation (argument dtypes, 16-byte alignment, constexprs) and options (warps,
stages, fp fusion; debug builds are not reproduced) and reads the cubin with cuobjdump. It also records
the torch ops run inside each op's Triton path (on a GPU, one kernel launch each). Nothing is launched:
the outputs are never written, and the figures are static (no timing).

    python benchmarks/compiled_kernels.py                  # sm_90 (H100, H200): a table
    python benchmarks/compiled_kernels.py --arch 80 100    # A100, B200
    python benchmarks/compiled_kernels.py --json           # one record per launch

Run it without TRITON_INTERPRET=1 (under the interpreter there is nothing to compile).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._python_dispatch

# The latent shapes of the benchmarks: SD3.5-M at 512 px (16 x 64 x 64), FLUX.1 at 1024 px (4096 packed
# tokens x 64), and a row of 105 elements, which no 16-byte access can tile (rows start unaligned).
SD35M = (24, 16, 64, 64)
FLUX = (8, 4096, 64)
ODD = (3, 3, 5, 7)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Launch:
    """One compiled launch: what the op asked for, and what the compiled code holds."""

    case: str  # the op call, e.g. "sde_step bf16 [24, 16, 64, 64] write_ode"
    kernel: str
    arch: int
    constexprs: dict
    num_warps: int
    fp_fusion: bool  # whether the compiler may contract a * b + c into one FMA
    registers: int = 0  # per thread
    stack: int = 0  # bytes per thread; with local, > 0 means spills
    local: int = 0
    shared: int = 0  # bytes per block, static
    loads: dict = field(default_factory=dict)  # global-load width in bits -> count of SASS instructions
    stores: dict = field(default_factory=dict)
    # approximate PTX instructions (div.full, sqrt.approx, ...) -> count
    approx_math: dict = field(default_factory=dict)
    # elements each thread adds before the first reduction's cross-thread tree (its operand's layout in
    # the TTGIR, sizePerThread); 0 in kernels without a reduction. It fixes the order of the row's sum.
    reduce_per_thread: int = 0
    # fused multiply-adds in fp32 (PTX fma.rn.f32): none in the streaming kernels, whose element-wise math
    # rounds each product as torch does (an ODE row's x + v * dt must equal the completions' own steps)
    fp32_fma: int = 0


class _TargetDriver:
    """The part of Triton's driver that compiling (not launching) asks of: the target and a device id."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


_OPS = ("sde_step", "sde_log_prob", "group_advantages")  # the modules whose launchers are driven
_SAME = ("CHUNK", "BLOCK")  # constexprs left out of the records: one value for every launch
# PTX's approximate fp32 forms: what a plain "/" or tl.sqrt compiles to on NVIDIA (not IEEE-rounded)
_APPROX = re.compile(r"\b((?:div|sqrt|rsqrt|rcp|lg2|ex2|sin|cos|tanh)\.(?:approx|full)(?:\.ftz)?\.f32)\b")
_WIDTH = {"256": 256, "128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def _access_widths(sass: str, op: str) -> dict[int, int]:
    """Count of ``op`` (LDG or STG) instructions by width in bits; a plain ``LDG.E`` moves 32 bits."""
    widths = Counter()
    for match in re.finditer(rf"\b{op}(?=[.\s])((?:\.\w+)*)", sass):  # not LDGSTS, LDGDEPBAR
        mods = match.group(1).split(".")[1:]
        widths[next((_WIDTH[m] for m in mods if m in _WIDTH), 32)] += 1
    return dict(sorted(widths.items()))


def _read_kernel(asm: dict, launch: Launch) -> None:
    """Fill ``launch``'s figures from a compiled kernel's cubin (resource use, SASS) and PTX."""
    from triton import knobs

    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    launch.registers, launch.stack = int(fields["REG"]), int(fields["STACK"])
    launch.local, launch.shared = int(fields["LOCAL"]), int(fields["SHARED"])
    launch.loads, launch.stores = _access_widths(sass.stdout, "LDG"), _access_widths(sass.stdout, "STG")
    launch.approx_math = dict(Counter(_APPROX.findall(asm["ptx"])))
    launch.reduce_per_thread = _reduce_per_thread(asm["ttgir"])
    launch.fp32_fma = len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", asm["ptx"]))


def _reduce_per_thread(ttgir: str) -> int:
    """``sizePerThread`` of the layout of the tensor the kernel's first ``tt.reduce`` sums (0: none)."""
    reduce = re.search(r"tt\.reduce.*?\}\)\s*:\s*\(tensor<[^,>]+,\s*(#\w+)>\)", ttgir, re.S)
    if reduce is None:
        return 0
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[(\d+)", ttgir, re.M))
    return int(layouts[reduce.group(1)])


@dataclass
class Recording:
    """What the op calls made inside :func:`compiling_for` launch. Set ``case`` before each call."""

    case: str = ""
    launches: list[Launch] = field(default_factory=list)
    # per case, the torch ops the Triton path ran: on a GPU each is one more kernel launch (views and
    # allocations, which launch nothing, are left out)
    torch_ops: dict[str, list[str]] = field(default_factory=dict)


class _TorchOps(torch.utils._python_dispatch.TorchDispatchMode):
    _ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")

    def __init__(self, into: list[str]):
        super().__init__()
        self.into = into

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self._ALLOCATIONS:
            self.into.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def compiling_for(arch: int):
    """Within: every Triton launch of the ops compiles for ``sm_<arch>`` and is recorded, not run; the
    torch ops of the ops' Triton paths are recorded too. Yields a :class:`Recording`."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted, nothing compiles")
    target = GPUTarget("cuda", arch, 32)
    rec = Recording()
    seen: dict = {}  # Triton's own cache key of a launch -> its compiled record

    def on_launch(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit, ident = fn.jit_function, (fn.jit_function, key)
        if ident not in seen:
            constants = compile["constants"]
            src = ASTSource(jit, compile["signature"], constants, compile["configs"][0])
            options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
            kernel = triton.compile(src, target=target, options=options)
            names = jit.arg_names  # constexprs are keyed by argument position
            flags = {names[p[0]]: v for p, v in constants.items() if names[p[0]] not in _SAME}
            launch = Launch("", fn.name, arch, flags, compile["num_warps"], compile["enable_fp_fusion"])
            _read_kernel(kernel.asm, launch)
            seen[ident] = launch
        rec.launches.append(dataclasses.replace(seen[ident], case=rec.case))
        return True  # handled: Triton skips its own compile, and the launch

    def recorded(path):  # a Triton path (the body of an op on CUDA tensors), its torch ops recorded
        def run(*args):
            with _TorchOps(rec.torch_ops.setdefault(rec.case, [])):
                return path(*args)

        return run

    ops = [importlib.import_module(f"densegrpo_fast.kernels.{m}") for m in _OPS]
    paths = {(op, name): getattr(op, name) for op in ops for name in vars(op) if name.endswith("_triton")}
    saved = [op.backend_for for op in ops]
    previous_hook, previous_driver = knobs.runtime.jit_cache_hook, driver._active  # None where no GPU
    driver.set_active(_TargetDriver(target))
    knobs.runtime.jit_cache_hook = on_launch
    for op in ops:
        op.backend_for = lambda t: "triton"
    for (op, name), path in paths.items():
        setattr(op, name, recorded(path))
    try:
        yield rec
    finally:
        for (op, name), path in paths.items():
            setattr(op, name, path)
        for op, backend in zip(ops, saved, strict=True):
            op.backend_for = backend
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver
        for jit in _jit_functions(ops):
            jit.device_caches.clear()  # compiled for the stand-in target: never to be launched


def _jit_functions(modules):
    from triton.runtime.jit import JITFunction

    from densegrpo_fast.kernels import _sde_math

    for module in (*modules, _sde_math):
        yield from (v for v in vars(module).values() if isinstance(v, JITFunction))


def _rows(b: int):
    sigma = torch.full((b,), 0.8)
    return sigma, torch.full((b,), 0.7), torch.full((b,), 0.5)


def run_cases(arch: int, shapes=(SD35M, FLUX, ODD), dtypes=tuple(DTYPES)) -> Recording:
    """Every op call the engine makes, at each shape and latent dtype, compiled for ``sm_<arch>``."""
    from densegrpo_fast.kernels import group_advantages, sde_log_prob, sde_step

    with compiling_for(arch) as rec:
        for shape in shapes:
            for name in dtypes:
                x = torch.zeros(shape, dtype=DTYPES[name])
                sigma, sigma_next, std = _rows(shape[0])
                for write_ode in (False, True):
                    rec.case = f"sde_step {name} {list(shape)}" + (" write_ode" if write_ode else "")
                    sde_step(x, x, sigma, sigma_next, std, x, write_ode=write_ode)
                for kl in (False, True):
                    rec.case = f"sde_log_prob {name} {list(shape)}" + (" kl" if kl else "")
                    v = x.clone().requires_grad_(True)
                    lp, k = sde_log_prob(x, v, x, sigma, sigma_next, std, ref_velocity=x if kl else None)
                    rec.case += " backward"
                    (lp.sum() + (k.sum() if kl else 0)).backward()
        # CPS (the coefficients-preserving step): its own compiled branch of every kernel, at SD3.5-M's shape
        for name in dtypes:
            x = torch.zeros(SD35M, dtype=DTYPES[name])
            sigma, sigma_next, std = _rows(SD35M[0])  # (std 0.5 <= sigma_next 0.7: a valid CPS noise std)
            rec.case = f"sde_step {name} {list(SD35M)} cps write_ode"
            sde_step(x, x, sigma, sigma_next, std, x, write_ode=True, cps=True)
            rec.case = f"sde_log_prob {name} {list(SD35M)} cps kl"
            v = x.clone().requires_grad_(True)
            lp, k = sde_log_prob(x, v, x, sigma, sigma_next, std, ref_velocity=x, cps=True)
            rec.case += " backward"
            (lp.sum() + k.sum()).backward()
        # Narrower noise or reference velocity than fp32 latents and velocity (a caller's choice the engine
        # does not make): the step and the recomputation must still sum a row in one order.
        x = torch.zeros(SD35M)
        sigma, sigma_next, std = _rows(SD35M[0])
        for name in ("bf16", "fp16"):
            narrow = torch.zeros(SD35M, dtype=DTYPES[name])
            rec.case = f"sde_step fp32 {list(SD35M)} noise {name}"
            sde_step(x, x, sigma, sigma_next, std, narrow)
            rec.case = f"sde_log_prob fp32 {list(SD35M)} kl v_ref {name}"
            sde_log_prob(x, x, x, sigma, sigma_next, std, ref_velocity=narrow)
        # Advantages: the recipes' 48 prompts x 24 images, sparse (1 column) and dense (T = 10 steps).
        for k in (1, 10):
            rewards = torch.zeros(48 * 24, k)
            for mask in (None, torch.ones(48 * 24, dtype=torch.bool)):
                for global_std in (False, True):
                    rec.case = f"group_advantages [{48 * 24}, {k}] G=24"
                    rec.case += (" mask" if mask is not None else "") + (" global_std" if global_std else "")
                    group_advantages(rewards, 24, mask=mask, global_std=global_std)
    return rec


def calls(rec: Recording, arch: int) -> list[dict]:
    """Per op call: its Triton launches and the torch ops its Triton path ran (kernels on a GPU, each)."""
    cases = dict.fromkeys(r.case for r in rec.launches)
    return [
        {
            "arch": arch,
            "case": case,
            "triton_launches": sum(r.case == case for r in rec.launches),
            "torch_ops": rec.torch_ops.get(case, []),
        }
        for case in cases
    ]


def _tables(launches: list[Launch], per_call: list[dict]) -> str:
    def widths(d):
        return " ".join(f"{n}x{w}" for w, n in sorted(d.items(), reverse=True)) or "-"

    lines = ["| arch | op call | Triton launches | torch ops (kernels on a GPU) |", "|---|---|---:|---|"]
    for c in per_call:
        ops = Counter(c["torch_ops"])
        names = ", ".join(f"{n} {name}" for name, n in ops.most_common())
        lines.append(
            f"| sm_{c['arch']} | {c['case']} | {c['triton_launches']} | {len(c['torch_ops'])} {names} |"
        )
    lines += [
        "",
        "| arch | op call | kernel | flags | warps | regs | spill (stack/local B) | smem B | loads (count x bits) | stores |",
        "|---|---|---|---|---:|---:|---|---:|---|---|",
    ]
    for r in launches:
        flags = " ".join(f"{k}={v}" for k, v in r.constexprs.items()) or "-"
        lines.append(
            f"| sm_{r.arch} | {r.case} | {r.kernel} | {flags} | {r.num_warps} | {r.registers} | "
            f"{r.stack}/{r.local} | {r.shared} | {widths(r.loads)} | {widths(r.stores)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90 = sm_90)")
    parser.add_argument("--json", action="store_true", help='{"launches": [...], "calls": [...]} on stdout')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    launches, per_call = [], []
    for arch in args.arch:
        rec = run_cases(arch)
        launches += rec.launches
        per_call += calls(rec, arch)
    if args.json:
        print(json.dumps({"launches": [asdict(r) for r in launches], "calls": per_call}))
    else:
        print(_tables(launches, per_call))
    return 0


if __name__ == "__main__":
    sys.exit(main())
