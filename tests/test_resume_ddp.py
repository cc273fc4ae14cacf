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

import sample
import support
import train

from conftest import MNIST, ROOT
from test_train import TINY_MODEL

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
    at_kill = support.load_checkpoint(os.path.join(killed, "ckpt.pt"))
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
        model, _, _, _ = sample.model_from_checkpoint(os.path.join(out, "ckpt.pt"))   # loads in one process
        reference = load(single)["ema"]                                             # sampling weights
        for k, v in model.state_dict().items():
            assert torch.allclose(v, reference[k], atol=1e-5), k

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *TINY, "--batch-size", "15", "--out", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "not divisible by the 2 DDP processes" in res.stderr


# ----------------------------------------------------------------------------------------------
#                     No lost or mixed runs: lock, stale temp files, full disk
# ----------------------------------------------------------------------------------------------

def start_training(out, *extra):
    """A train.py subprocess that runs until stopped; returns it once its first checkpoint exists."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--steps", "100000",
                             "--ckpt-every", "2", "--log-every", "1000", "--out", out, *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "ckpt.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    return proc


def test_a_second_run_on_the_same_folder_is_refused_until_the_first_ends(tmp_path):
    out = str(tmp_path / "run")
    first = start_training(out)
    try:
        with pytest.raises(support.UserError) as e:
            train.main([*TINY, "--steps", "100000", "--out", out, "--resume", "auto"])
        msg = str(e.value)
        assert f"{out} is in use by pid {first.pid} on " in msg and " since " in msg and "another --out" in msg
    finally:
        first.send_signal(signal.SIGKILL)     # killed: no clean-up, its lock must not outlive it
        first.wait(timeout=30)
    step = support.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    train.main([*TINY, "--steps", str(step + 2), "--out", out, "--resume", "auto"])   # takes the lock over
    assert load(out)["step"] == step + 2


def test_stale_temp_files_of_a_killed_save_are_removed_on_the_next_save(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "2", "--out", out])
    stale = os.path.join(out, ".ckpt.pt.abc123.tmp")
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")
    train.main([*TINY, "--steps", "4", "--out", out, "--resume", "auto"])
    assert not os.path.exists(stale) and load(out)["step"] == 4


def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    out, real_save, calls = str(tmp_path / "run"), torch.save, []

    def save_until_the_disk_fills(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2:          # torch reports ENOSPC as a RuntimeError raised while handling the OSError
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(support.DiskFull) as e:
        train.main([*TINY, "--steps", "4", "--ckpt-every", "2", "--out", out])
    msg = str(e.value)
    assert msg.startswith(f"no space left on the disk of {out}; last good checkpoint: ") and "(step 2)" in msg
    assert "\n" not in msg and "--resume auto" in msg
    assert load(out)["step"] == 2 and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_really_full_disk(tmp_path):
    """The same on a real 1 MiB tmpfs (needs the right to mount; skipped where there is none)."""
    import sample
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        train.main([*TINY, "--steps", "2", "--out", str(tmp_path / "small")])
        with pytest.raises(OSError), open(disk / "filler", "wb", buffering=0) as f:
            while True:                                  # fill the disk to the last byte
                f.write(b"\0" * 4096)
        with pytest.raises(support.DiskFull, match=f"no space left on the disk of {disk} while writing grid.png"):
            sample.main(["--ckpt", str(tmp_path / "small" / "ckpt.pt"), "--num-samples", "64", "--steps", "1",
                         "--out", str(disk / "grid.png")])
        with pytest.raises(support.DiskFull, match="last good checkpoint: none was written yet"):
            train.main([*TINY, "--steps", "2", "--out", str(disk / "run")])
        assert not [n for n in os.listdir(disk) if n.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------------------------
#                        DDP: a silent peer, and SIGTERM through torchrun
# ----------------------------------------------------------------------------------------------

def test_a_stopped_ddp_process_ends_the_run_within_the_timeout(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *TINY, "--steps", "100000", "--ckpt-every", "2",
                             "--log-every", "1000", "--ddp-timeout", "5", "--out", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 90
        while not os.path.exists(os.path.join(out, "ckpt.pt")):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-f", f"train.py.*--out {out}"], capture_output=True, text=True)
        pids = sorted(int(p) for p in workers.stdout.split() if int(p) != proc.pid)
        assert len(pids) == 2, workers.stdout
        os.kill(pids[-1], signal.SIGSTOP)                       # one rank stops answering
        stopped = time.time()
        output = proc.communicate(timeout=120)[0]
        assert time.time() - stopped < 60                       # 5 s timeout, then torchrun's shutdown
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "another DDP process stopped answering for 5 s (--ddp-timeout) or died" in output, output[-3000:]
    step = support.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    train.main([*TINY, "--steps", str(step + 2), "--out", out, "--resume", "auto"])   # resumable
    assert load(out)["step"] == step + 2


def test_sigterm_to_torchrun_checkpoints_on_every_rank_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *TINY, "--steps", "100000", "--ckpt-every", "1000",
                             "--log-every", "1000", "--out", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 90
    while not os.path.exists(os.path.join(out, "log.csv")) or os.path.getsize(os.path.join(out, "log.csv")) == 0:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    # torchrun forwards SIGTERM to the workers; they finish the step, rank 0 saves, and torchrun itself
    # then exits 1 with its own SignalException (its behaviour, which the README states).
    assert "stopped by SIGTERM at step" in output and proc.returncode == 1, output[-3000:]
    ckpt = support.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert int(log_rows(out)[-1]["step"]) == ckpt["step"] > 0 and len(ckpt["rng"]["ranks"]) == 2
    train.main([*TINY, "--steps", str(ckpt["step"] + 2), "--out", out, "--resume", "auto"])
    assert load(out)["step"] == ckpt["step"] + 2


def log_rows(out):
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def start_torchrun(out, *flags):
    """torchrun of two ranks on TINY, left running -> the Popen. --compile off: auto would compile a run of
    1,000+ steps and not a short one, and compiled and eager steps differ in the last bits."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *TINY, "--compile", "off", *flags, "--out", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def test_a_killed_rank_leaves_rank_0s_checkpoint_of_the_last_finished_step(tmp_path):
    """SIGKILL one of two ranks between checkpoints: torchrun SIGTERMs rank 0, whose collective fails; rank 0
    saves the last step every rank finished and prints the torchrun command that continues it. That checkpoint
    is step N of an uninterrupted run, bit for bit (weights, EMA, optimizer, batch generator, rank 0's RNG)."""
    out, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    proc = start_torchrun(out, "--steps", "100000", "--ckpt-every", "0", "--log-every", "5", "--label-dropout", "0")
    try:
        deadline = time.time() + 90
        while len(log_rows(out) if os.path.exists(os.path.join(out, "log.csv")) else []) < 2:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        assert not os.path.exists(os.path.join(out, "ckpt.pt"))          # no checkpoint was due
        workers = subprocess.run(["pgrep", "-f", f"train.py.*--out {out}"], capture_output=True, text=True)
        pids = sorted(int(p) for p in workers.stdout.split() if int(p) != proc.pid)
        assert len(pids) == 2, workers.stdout
        os.kill(pids[-1], signal.SIGKILL)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = load(out)
    step = killed["step"]
    assert f"and rank 0 saved step {step} alone" in output, output[-3000:]
    assert "with: torchrun --nproc_per_node=2 train.py" in output and "--resume auto --out" in output
    assert step >= 10 and len(killed["rng"]["ranks"]) == 1
    proc = start_torchrun(whole, "--steps", str(step), "--ckpt-every", "0", "--log-every", "5", "--label-dropout", "0")
    assert proc.communicate(timeout=180)[0] and proc.returncode == 0
    assert_identical(load(whole), killed)
    train.main([*TINY, "--steps", str(step + 2), "--label-dropout", "0", "--out", out, "--resume", "auto"])
    assert load(out)["step"] == step + 2
