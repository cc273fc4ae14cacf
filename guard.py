"""
What keeps a run's work safe: files written so that no crash, full disk or second run loses or mixes up
work (atomic writes, a lock on the run folder, the training log), outputs that never overwrite inputs,
clean stops on SIGINT/SIGTERM, and the decisions every DDP rank must take together (stop, NaN, snapshot),
so that a run stops at the same step everywhere and resumes exactly.

    TrainingGuard     after each step: stop, time limit, NaN, snapshots, agreed over ranks
    TrainingMeter     the rank-mean loss, images/s and the progress line, pauses not counted
    atomic_write      temp file + fsync + rename: a crash leaves the old file or the new one
"""
import contextlib
import csv
import datetime
import errno
import fcntl
import glob
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from cli import Progress, UserError

# ----------------------------------------------------------------------------------------------
#                                  Files that survive a crash
# ----------------------------------------------------------------------------------------------

UMASK = os.umask(0o022)          # read once, at import: reading it means setting it, for the whole process
os.umask(UMASK)


class DiskFull(UserError):
    """No space left where a file was being written; the file itself was left as it was."""


def disk_full(error):
    """Whether an exception, or one it was raised from, is 'no space left'
    (torch wraps it in a RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def move_into_place(path, target):
    """fsync a complete file and rename it to its final name (atomic on POSIX). An ONNX graph's external
    weights (`<path>.data`), when there are any, go first: a graph never points at missing ones."""
    for source, destination in ((path + ".data", target + ".data"), (path, target)):
        if source == path or os.path.isfile(source):
            with open(source, "rb") as f:
                os.fsync(f.fileno())      # the data on disk before the name points at it
            os.replace(source, destination)


def atomic_write(path, write_fn, binary=True):
    """Write a file so a crash at any moment leaves either the old file or the complete new one:
    write a temp file in the same folder, then move_into_place over the target."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; choose a writable output path") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)  # mkstemp makes 0600; give the mode a plain open() would
            write_fn(f)
        move_into_place(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(e):
            raise DiskFull(f"no space left on the disk of {folder} while writing {os.path.basename(path)} "
                           f"(left unchanged); free some space") from None
        raise


def remove_stale_temp_files(path):
    """Delete the temp files a killed atomic_write of `path` left behind
    (the caller holds the folder's lock)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def check_writable(path):
    """Fail before minutes of work, not after, when the output cannot be written."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a file; give a file name (inside it, if you like)")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"cannot write to {folder}: it is a file, not a folder; choose another output path")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror}; choose a writable output path") from None


def same_file(a, b):
    """Whether two paths name one file, however spelled: relative, with .., through a symlink, a hard link."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:             # one of them does not exist (yet)
        return False


def refuse_overwrite(outputs, inputs):
    """Before any work: no output may be one of the inputs, nor an input's sidecar (.json) or external
    weights (.data). outputs, inputs: {flag: path or None}."""
    for out_flag, out in outputs.items():
        for in_flag, given in inputs.items():
            companions = ((given, ""), (f"{given}.json", "the sidecar of "),
                          (f"{given}.data", "the weights of "))
            for path, what in companions:
                if out and given and same_file(out, path):
                    raise UserError(f"{out_flag} {out} would overwrite {what}{in_flag} {given}, "
                                    f"an input of this run; choose another output path")


# ----------------------------------------------------------------------------------------------
#                                The run folder, its lock and log
# ----------------------------------------------------------------------------------------------

def make_run_folder(out, data_dir):
    """Create the run folder out (and out/samples) -> whether this call created it. Never inside the data."""
    data = data_dir and os.path.realpath(data_dir)
    if data and os.path.commonpath([data, os.path.realpath(out)]) == data:
        raise UserError(f"--out {out} is inside --data-dir {data_dir}: the run's files would become part of "
                        f"the data; pass an --out outside it")
    created = not os.path.exists(out)
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {out}: {e.strerror}; pass a writable --out") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"run folder {out} is not writable; pass a writable --out")
    return created


def remove_if_unused(out):
    """After a failed start: the run folder this run created, if nothing but its lock and an empty
    samples/."""
    with contextlib.suppress(OSError):
        if set(os.listdir(out)) <= {".lock", "samples"} and not os.listdir(os.path.join(out, "samples")):
            shutil.rmtree(out)


def resume_command(argv, out):
    """The command that continues a run: its own flags, with --resume auto --out OUT."""
    kept, skip = [], False
    for a in argv:
        if skip or a in ("--resume", "--out") or a.startswith(("--resume=", "--out=")):
            skip = a in ("--resume", "--out")
            continue
        kept.append(a)
    return " ".join(["python train.py", *map(shlex.quote, kept), "--resume auto --out", shlex.quote(out)])


class RunLock:
    """An exclusive lock on a run folder while a run writes to it (OUT/.lock, fcntl.flock).

    The kernel drops the lock when its process ends, however it ends, so a killed run leaves no stale lock:
    the next run takes it over. The file names the holder (pid, host, start time) for the error message."""

    def __init__(self, folder):
        self.fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(self.fd, 300).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):      # e.g. ENOLCK: this file system has no locks
                raise UserError(f"cannot lock {folder} ({e.strerror}); "
                                f"pass an --out on a local disk") from None
            raise UserError(f"{folder} is in use by {holder}; wait for that run to end, stop it, or pass "
                            f"another --out") from None
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        with contextlib.suppress(OSError):   # who holds it is for the message; the lock works without it
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, holder.encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)                # closing the file drops the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


CSV_FIELDS = ["step", "loss", "lr", "images_per_s", "wall_time_s"]


class RunLog:
    """log.csv and, when tensorboard is installed, TensorBoard scalars in OUT/tb. A resumed run keeps the
    rows up to its checkpoint's step (a killed run may have logged further) and goes on from there."""

    def __init__(self, path, step):
        rows, self.tb = [], None
        if step and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f)
                        if (r.get("step") or "").isdigit() and int(r["step"]) <= step]

        def write(f):
            w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        atomic_write(path, write, binary=False)     # a crash now keeps the old log, not half of it
        self.file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.file, CSV_FIELDS)
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(os.path.dirname(path), "tb"), purge_step=step)

    def write(self, step, loss, lr, images_per_s, wall):
        values = (step, f"{loss:.6g}", f"{lr:.6g}", f"{images_per_s:.1f}", f"{wall:.1f}")
        self.csv.writerow(dict(zip(CSV_FIELDS, values)))
        self.file.flush()
        for name, value in (("loss", loss), ("lr", lr)) if self.tb else ():
            self.tb.add_scalar(name, value, step)

    def close(self):
        with contextlib.suppress(OSError):    # a full disk: the checkpoint, not the log, is what resumes
            self.file.close()
        if self.tb:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
#                    DistributedDataParallel plumbing (only under torchrun)
# ----------------------------------------------------------------------------------------------
# A signal, a NaN or the time limit must stop every rank at the same step, or DDP hangs; the logged
# loss is the ranks' mean; each rank's RNG state goes into the checkpoint for an exact resume.

def setup_ddp(device, timeout_s):
    """-> (rank, world, device); under torchrun (WORLD_SIZE > 1) joins the group: nccl on GPUs, gloo on CPU.
    A collective that waits longer than timeout_s for another process fails (see peer_lost)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, device


def peer_lost(error):
    """Whether a RuntimeError is a collective whose peer stopped answering (timeout) or died."""
    return bool(re.search(r"timed out|connection (closed|reset)|broken pipe", str(error), re.IGNORECASE))


def over_ranks(values, op, world, device):
    """A list of floats combined over ranks: op "max" (true on any rank, for flags) or "mean"
    (the logged loss)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (t if op == "max" else t / world).tolist()


def rng_states(world, device):
    """Every rank's global RNG state (it draws the label dropout), in rank order, for the checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, {k: v.cpu() for k, v in state.items()})
    return states


# ----------------------------------------------------------------------------------------------
#                              Around each step of the training loop
# ----------------------------------------------------------------------------------------------

class StopFlag:
    """SIGINT/SIGTERM set .signum: a long loop finishes its step, saves and exits. A second signal kills.
    `message` is printed at once on Ctrl-C (SIGINT), so that the user knows it was heard."""

    def __init__(self, message=None):
        self.signum, self.message = None, message
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])
        if self.message and signum == signal.SIGINT:
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


class TrainingGuard:
    """The decisions taken after each step, the same on every rank: stop (a signal or --max-minutes), fail
    (a NaN loss), keep a timed snapshot (--snapshot-minutes). It also knows the last good checkpoint, for
    the messages. t_start: when train() began (the clock of --max-minutes); wall_before: the run's wall
    time before this process, for a resumed run."""

    def __init__(self, out, t_start, max_minutes, snapshot_minutes, wall_before, world, device, master,
                 last_good):
        self.out, self.max_minutes, self.world, self.device = out, max_minutes, world, device
        self.t_start, self.wall_before, self.last_good = t_start, wall_before, last_good
        self.snapshots = [m for m in snapshot_minutes or () if 60 * m > wall_before]   # those not yet passed
        self.stop_flag = StopFlag("stopping after this step, with a checkpoint (Ctrl-C again to abort)"
                                if master else None)
        self.stopping = self.snapshot_due = False

    def wall(self):
        """The run's wall time in seconds: this process's and that of the runs it resumed."""
        return self.wall_before + time.time() - self.t_start

    def time_left(self):
        """Seconds left of --max-minutes (None without it), for the progress line."""
        return 60 * self.max_minutes - (time.time() - self.t_start) if self.max_minutes else None

    def after_step(self, step, loss_value, fp16):
        """Agree over ranks on NaN, stop and snapshot; a NaN ends the run
        (fp16: GradScaler skips such steps)."""
        timed_out = self.max_minutes is not None and time.time() - self.t_start > 60 * self.max_minutes
        bad = not math.isfinite(loss_value) and not fp16
        snapshot = bool(self.snapshots) and self.wall() >= 60 * self.snapshots[0]
        stop = self.stop_flag.signum is not None or timed_out
        bad, self.stopping, self.snapshot_due = over_ranks([bad, stop, snapshot], "max", self.world,
                                                           self.device)
        if bad:
            raise UserError(f"loss became {loss_value} at step {step}; "
                            f"last good checkpoint: {self.last_good}; lower --lr or use --amp off")

    def take_snapshot(self):
        """The due snapshot, struck off the list -> its path OUT/ckpt_<M>min.pt."""
        return os.path.join(self.out, f"ckpt_{self.snapshots.pop(0):g}min.pt")

    def checkpoint_saved(self, path, step):
        """The last good checkpoint, which the error messages name."""
        self.last_good = f"{path} (step {step})"

    def disk_full_error(self):
        return DiskFull(f"no space left on the disk of {self.out}; last good checkpoint: {self.last_good}; "
                        f"free some space, then --resume auto")

    @property
    def signum(self):
        """The signal that stopped the run, or None."""
        return self.stop_flag.signum

    def why_stopped(self, step, steps):
        if self.signum is not None:
            return f"stopped by {signal.Signals(self.signum).name}"
        return f"stopped after --max-minutes {self.max_minutes}" if step < steps else "done"

    def close(self):
        self.stop_flag.restore()


class TrainingMeter:
    """What the log rows and the progress line say: the loss averaged over ranks and steps, and images/s of
    the steps since the last row (every step counts, a skipped fp16 one too; grids and checkpoints, inside
    `paused()`, do not). master: rank 0, the one that writes."""

    def __init__(self, log_path, step, total_steps, batch_size, time_left, budget, world, device, master):
        self.batch_size, self.world, self.device, self.master = batch_size, world, device, master
        self.progress = Progress(total_steps, "step ", time_limit=time_left, file=sys.stdout, budget=budget) \
            if master else None
        self.losses, self.steps_in_row, self.skipped, self.t_log, self.note = [], 0, 0, time.time(), ""
        self.log = RunLog(log_path, step) if master else None

    def add(self, loss_value, step_skipped):
        self.steps_in_row += 1
        self.skipped += step_skipped
        if math.isfinite(loss_value):
            self.losses.append(loss_value)

    def write_row(self, step, lr, wall):
        """The rank-mean loss into log.csv and the progress note; starts the next row's count."""
        (mean_loss,) = over_ranks([sum(self.losses) / max(len(self.losses), 1)], "mean", self.world,
                                  self.device)
        images_per_s = self.batch_size * self.steps_in_row / max(time.time() - self.t_log, 1e-9)
        self.note = (f" | loss {mean_loss:.4f} | {images_per_s:.0f} img/s | lr {lr:.2e}"
                     + (f" | {self.skipped} fp16 steps skipped" if self.skipped else ""))
        if self.master:
            self.log.write(step, mean_loss, lr, images_per_s, wall)
        self.losses, self.steps_in_row, self.t_log = [], 0, time.time()

    def show(self, step, force):
        if self.master:
            self.progress.update(step, self.note, force=force)

    @contextlib.contextmanager
    def paused(self):
        """Work that does not count against images/s."""
        t_pause = time.time()
        try:
            yield
        finally:
            self.t_log += time.time() - t_pause

    def close(self):
        if self.master:
            self.progress.close()
        if self.log:
            self.log.close()
