"""Tests import the repository's modules (top level and tools/), and run on few threads (CI has 2 cores)."""
import os
import sys

# Spinning OpenMP threads collapse when another process shares the 2 cores (a subprocess test, a
# parallel job): passive waiting must be set before torch loads OpenMP. Subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
torch.set_num_threads(min(2, torch.get_num_threads()))

# Real MNIST, the four official IDX .gz files the repository ships (mnist/); $MNIST_DIR may name another copy.
MNIST = os.environ.get("MNIST_DIR") or os.path.join(ROOT, "mnist")


@pytest.fixture(autouse=True)
def restore_threads():
    """Every test leaves torch's thread count as it found it (train.main --threads changes it)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def one_thread():
    """One torch thread for tests of tiny models: two OpenMP threads thrash on a busy 2-core machine."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_tf32_leak():
    """No test leaves TF32 on or off for the tests after it: their fp32 comparisons must stay fp32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert after == before, f"TF32 flags changed from {before} to {after} by this test"
