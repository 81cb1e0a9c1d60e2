"""Test-tier setup. The first lines choose Triton's mode before anything imports triton."""

import os
import signal

# Triton's interpreter must be chosen before triton is first imported (diffusers, transformers, peft and
# torch.compile all import it). On a CPU machine the Triton kernels run interpreted on CPU tensors; on a
# GPU machine they run compiled. `import torch` alone does not import triton.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# benchmarks/gpu_suite.sh stops pytest with SIGINT (`timeout -s INT`) so that it still prints its summary; a
# shell without job control starts its background commands with SIGINT ignored, which Python keeps: take it back
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
torch.set_num_threads(1)  # tiny tensors and 2 shared cores: one thread per process is fastest here


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_suite.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random toy model (2 layers, width 32): a training iteration takes well under a second."""
    from densegrpo_fast.policies.toy import ToyArch, ToyPolicy

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    ToyPolicy(ToyArch(num_layers=2, num_heads=2, head_dim=16, text_dim=32, pooled_dim=32)).save(path)
    return path
