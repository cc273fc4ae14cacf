"""Exactness of train.py's resume and DDP on CPU:
(1) N steps + resume for N more ends bit-identical to 2N steps (model, EMA, optimizer, RNG);
(2) a run SIGKILLed after a checkpoint, resumed, ends bit-identical to an uninterrupted run;
(3) 2 gloo processes under torchrun see, by construction, the same global batch as 1 process
    (every rank draws the global batch's indices, timesteps and noise from the run's generator and
    keeps rows rank::world), so their averaged gradient is the single-process gradient: the loss
    curves agree to float rounding. Label dropout is the one per-rank draw (global RNG, seed + rank),
    so these runs turn it off. The DDP checkpoint loads in one process, without `module.` prefixes,
    and a DDP run resumed from a single-process checkpoint continues the same curve."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import runtime
import train

from conftest import MNIST, ROOT, needs_mnist
from test_train import TINY_MODEL

pytestmark = needs_mnist
TINY = ["--data-dir", MNIST, *TINY_MODEL, "--batch-size", "16", "--threads", "1", "--device", "cpu", "--warmup", "3"]


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


def losses(out):
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def assert_identical(a, b):
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), f"optimizer state {i}.{name} differs"
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert torch.equal(a["rng"]["ranks"][0]["torch"], b["rng"]["ranks"][0]["torch"])


def test_resume_is_bit_exact(tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    train.main([*TINY, "--steps", "8", "--out", whole])
    train.main([*TINY, "--steps", "4", "--out", halves])
    train.main([*TINY, "--steps", "8", "--out", halves, "--resume", os.path.join(halves, "ckpt.pt")])
    assert_identical(load(whole), load(halves))


def test_kill_and_resume_is_bit_exact(tmp_path):
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    steps = ["--steps", "40", "--ckpt-every", "3", "--log-every", "1"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *steps, "--out", killed],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(killed, "ckpt.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)                  # no chance to clean up: the atomic checkpoint must survive
    proc.wait(timeout=30)
    at_kill = cli.load_checkpoint(os.path.join(killed, "ckpt.pt"))
    assert 3 <= at_kill["step"] < 40, "the run finished before the kill; nothing was tested"
    train.main([*TINY, *steps, "--out", killed, "--resume", "auto"])
    train.main([*TINY, *steps, "--out", whole])
    assert_identical(load(whole), load(killed))
    assert losses(killed) == losses(whole)            # log rows past the checkpoint were dropped on resume


def torchrun(args, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *args, "--out", out],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_ddp_matches_single_process_and_resumes(tmp_path):
    args = [*TINY, "--label-dropout", "0", "--steps", "8", "--log-every", "1"]
    single, single4 = str(tmp_path / "single"), str(tmp_path / "single4")
    ddp, ddp_resumed = str(tmp_path / "ddp"), str(tmp_path / "ddp_resumed")
    train.main([*args, "--out", single])
    train.main([*args, "--out", single4, "--steps", "4"])
    torchrun(args, ddp)
    torchrun([*args, "--resume", os.path.join(single4, "ckpt.pt")], ddp_resumed)

    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    assert losses(ddp_resumed) == pytest.approx(losses(single)[4:], rel=1e-5, abs=1e-6)   # its log starts at 5
    for out in (ddp, ddp_resumed):
        ckpt = load(out)
        assert ckpt["step"] == 8 and len(ckpt["rng"]["ranks"]) == 2
        assert not any(k.startswith("module.") for k in ckpt["model"])
        model, _, _, _ = runtime.model_from_checkpoint(os.path.join(out, "ckpt.pt"))   # loads in one process
        reference = load(single)["ema"]                                             # sampling weights
        for k, v in model.state_dict().items():
            assert torch.allclose(v, reference[k], atol=1e-5), k

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *TINY, "--batch-size", "15", "--out", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "not divisible by the 2 DDP processes" in res.stderr
