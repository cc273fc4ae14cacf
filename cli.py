"""
What every script shares on the command line and on disk: the one-line error for bad input, flag
checks, a progress line, a clean stop on SIGINT/SIGTERM, the sampling flags, and files written so that
no crash, full disk or second run loses or mixes up work (atomic writes, a lock on the run folder,
checksummed checkpoints).

PyTorch is imported inside the few functions that need it, not at the top, so that a script can
parse its flags with this module before it loads torch (which takes seconds).
"""
import argparse
import contextlib
import csv
import dataclasses
import errno
import fcntl
import glob
import hashlib
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import warnings


class UserError(Exception):
    """Bad input from the user (path, file, label, flag); str(e) is one line naming the problem and the fix."""


def first_line(error, limit=160):
    """The first line of an exception's message (or its type's name), cut to `limit` characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|not enough memory",
                           re.IGNORECASE)


def run_cli(main, memory_hint="lower --batch-size"):
    """Run a script's main(); a UserError becomes `script: error: message` and exit status 2, not a traceback.
    Ctrl-C is one line and exit status 130 (every file is written atomically, so none is left half-written);
    running out of memory is one line that names the flag to lower (memory_hint)."""
    name = os.path.basename(sys.argv[0])
    try:
        main()
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C); no file was left half-written", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or OUT_OF_MEMORY.search(str(e))):
            raise
        what = first_line(e, 80) or "MemoryError"
        print(f"{name}: error: out of memory ({what}); {memory_hint}", file=sys.stderr)
        sys.exit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends (default: X) to a flag's help, except where there is nothing to say: a required flag, a default
    of None (the help text says what None means), or a help text that already names its default."""

    def _get_help_string(self, action):
        if action.required or action.default is None or "(None" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: a flag error is one line (`prog: error: ...`, exit
    status 2) without the usage block, and --help shows every flag's default."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": DefaultsHelpFormatter, **kwargs})

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(cast, test, wanted):
    """An argparse type: text -> number, refusing NaN, infinities and values outside `wanted`."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


def number_list(kind):
    """An argparse type: '8,64,256' -> [8, 64, 256], each item checked by kind (e.g. positive_int)."""
    def parse(text):
        return [kind(item) for item in text.split(",") if item.strip()] or kind("")
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer > 0")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def duration(seconds):
    """Seconds as '42 s', '3.5 min' or '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """One line on how long work is going: count/total, percent, elapsed time and what is left. On a
    terminal the line is rewritten in place; in a log file a new line comes at most every `every` seconds
    (and whenever update is forced). With a time limit, percent and time left follow whichever ends first."""

    def __init__(self, total, what="", time_limit=None, every=30.0, file=None, budget=None):
        self.total, self.what, self.time_limit, self.every = total, what, time_limit, every
        self.budget = budget            # how the time limit is named, e.g. "--max-minutes 30"
        self.file = file or sys.stderr
        self.tty = self.file.isatty()
        self.t0, self.last, self.first = time.monotonic(), -float("inf"), None

    def update(self, done, note="", force=False):
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else self.every):
            return
        elapsed, self.last = now - self.t0, now
        # The rate counts from the first update: the first unit of work may include one-time set-up.
        self.first = self.first or (now, done)
        rate = (done - self.first[1]) / max(now - self.first[0], 1e-9)
        fraction, left = done / self.total, (self.total - done) / rate if rate > 0 else float("inf")
        count = f"{done}/{self.total} ({min(fraction, 1):.0%})"
        if self.time_limit is not None and self.time_limit - elapsed < left:   # the clock ends the work first
            fraction, left = elapsed / self.time_limit, max(self.time_limit - elapsed, 0)
            count = f"{done} ({min(fraction, 1):.0%} of {self.budget or duration(self.time_limit)})"
        line = (f"{self.what}{count}{note} | {duration(elapsed)} elapsed, "
                + (f"{duration(left)} left" if left < float("inf") else "time left unknown"))
        print("\r" + line + "\x1b[K" if self.tty else line, end="" if self.tty else "\n", file=self.file, flush=True)

    def close(self):
        if self.tty and self.first:
            print(file=self.file)


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


def has_fast_bf16(device):
    """Whether a CUDA device computes bf16 natively: compute capability 8 (Ampere) or newer. Earlier GPUs (a T4)
    emulate it, and torch.cuda.is_bf16_supported() counts the emulation, so it cannot decide this."""
    import torch
    return torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def pick_device(name=None):
    """--device value (cpu, cuda, cuda:N) -> torch.device; default: CUDA when available, else CPU."""
    import torch
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"unknown or unsupported --device {name!r}; use cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested but no CUDA GPU is available; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
#                                  Files that survive a crash
# ----------------------------------------------------------------------------------------------

UMASK = os.umask(0o022)          # read once, at import: reading it means setting it, for the whole process
os.umask(UMASK)


class DiskFull(UserError):
    """No space left where a file was being written; the file itself was left as it was."""


def disk_full(error):
    """Whether an exception, or one it was raised from, is 'no space left' (torch wraps it in a RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_write(path, write_fn, binary=True):
    """Write a file so a crash at any moment leaves either the old file or the complete new one:
    write a temp file in the same folder, flush + fsync, then rename over the target (atomic on POSIX)."""
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(e):
            raise DiskFull(f"no space left on the disk of {folder} while writing {os.path.basename(path)} "
                           f"(left unchanged); free some space") from None
        raise


def remove_stale_temp_files(path):
    """Delete the temp files a killed atomic_write of `path` left behind (the caller holds the folder's lock)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        try:
            os.unlink(tmp)
        except OSError:
            pass


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
                raise UserError(f"cannot lock {folder} ({e.strerror}); pass an --out on a local disk") from None
            raise UserError(f"{folder} is in use by {holder}; wait for that run to end, stop it, or pass another "
                            f"--out") from None
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
            companions = ((given, ""), (f"{given}.json", "the sidecar of "), (f"{given}.data", "the weights of "))
            for path, what in companions:
                if out and given and same_file(out, path):
                    raise UserError(f"{out_flag} {out} would overwrite {what}{in_flag} {given}, an input of this "
                                    f"run; choose another output path")


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file: identifies the checkpoint an exported ONNX or engine was built from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


CSV_FIELDS = ["step", "loss", "lr", "images_per_s", "wall_time_s"]


class RunLog:
    """log.csv and, when tensorboard is installed, TensorBoard scalars in OUT/tb. A resumed run keeps the
    rows up to its checkpoint's step (a killed run may have logged further) and goes on from there."""

    def __init__(self, path, step):
        rows, self.tb = [], None
        if step and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit() and int(r["step"]) <= step]

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
        self.csv.writerow(dict(zip(CSV_FIELDS, (step, f"{loss:.6g}", f"{lr:.6g}", f"{images_per_s:.1f}", f"{wall:.1f}"))))
        self.file.flush()
        for name, value in (("loss", loss), ("lr", lr)) if self.tb else ():
            self.tb.add_scalar(name, value, step)

    def close(self):
        with contextlib.suppress(OSError):    # a full disk: the checkpoint, not the log, is what resumes
            self.file.close()
        if self.tb:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
#                                         Checkpoints
# ----------------------------------------------------------------------------------------------
# A checkpoint is one torch.save'd dict of tensors and plain Python values, loadable with
# weights_only=True (no pickled code can run), that holds everything needed to rebuild the model:
#   format, version       what this file is, so a foreign .pt is refused with a clear message
#   sha256                a checksum of all the rest (content_sha256), so a damaged file is refused
#   model_config          DiTConfig as a dict
#   diffusion_config      DiffusionConfig as a dict
#   model, ema            state dicts (ema = the exponential moving average used for sampling)
#   class_names           label names of the training set (["0", ..., "9"] for MNIST)
#   step, optimizer, rng, args, ...   training state for --resume (train.py adds what it needs)
# runtime.model_from_checkpoint turns one back into a DiT.

# The trained model the repository ships (train.py's CPU default, EMA weights; its record is in the file and
# in docs/results.md): what the sampling, export and measuring scripts use when --ckpt is not given.
SHIPPED_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "dit-t4-mnist.pt")
SHIPPED_EXPORT_DIR = os.path.join("runs", "shipped")   # export.py's folder for it, outside the tracked files


def checkpoint_or_shipped(path):
    """--ckpt as given, or (None) the shipped checkpoint, said in one line on stderr."""
    if path is not None:
        return path
    if not os.path.isfile(SHIPPED_CKPT):
        raise UserError(f"no --ckpt given and the shipped model {SHIPPED_CKPT} is missing; pass --ckpt "
                        f"RUN/ckpt.pt")
    print(f"note: no --ckpt given: using the shipped model {os.path.relpath(SHIPPED_CKPT)} (DiT-T/4 trained on "
          f"MNIST)", file=sys.stderr)
    return SHIPPED_CKPT


CHECKPOINT_FORMAT = "dit-checkpoint"
CHECKPOINT_VERSION = 2          # version 2 carries the checksum; version 1 files (without one) still load


def config_dict(config):
    """A dataclass config as a plain dict (what checkpoints and sidecars store)."""
    return dataclasses.asdict(config)


def content_sha256(value, h=None):
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's repr,
    dict keys in sorted order. A flipped byte anywhere in the weights changes it."""
    import torch
    h = h or hashlib.sha256()
    if isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            content_sha256(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            content_sha256(item, h)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def save_checkpoint(path, state):
    """Save a checkpoint dict atomically, stamped with the format, the version and the content's checksum.
    Temp files of earlier, killed saves to the same path are removed first."""
    import torch
    remove_stale_temp_files(path)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    state["sha256"] = content_sha256(state)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; every way it can be wrong is a one-line UserError."""
    import torch
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise UserError(f"checkpoint {path} {what}; pass the ckpt.pt written by train.py")
    try:
        with warnings.catch_warnings():      # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # The weights-only unpickler names a refused import as "GLOBAL module.name"; any other
        # failure (bad opcode, broken zip) means the bytes are not a complete torch file.
        if "GLOBAL" in str(e):
            raise UserError(f"{path} contains pickled code or objects, which are refused for safety; "
                            f"only checkpoints written by train.py load") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file); "
                        f"use the ckpt.pt written by train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a DiT checkpoint of this project; pass the ckpt.pt written by train.py")
    if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise UserError(f"{path} has checkpoint format version {ckpt.get('version')}, this code reads "
                        f"versions 1-{CHECKPOINT_VERSION}; retrain or use the matching code version")
    if ckpt["version"] >= 2 and ckpt.pop("sha256", None) != content_sha256(ckpt):
        raise UserError(f"{path} is damaged: its content does not match its checksum (a changed or flipped byte); "
                        f"use an intact copy or an earlier checkpoint")
    missing = [k for k in ("model_config", "diffusion_config", "model") if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it is incomplete, use another checkpoint")
    return ckpt


# ----------------------------------------------------------------------------------------------
#                         The sampling flags of sample.py and infer_trt.py
# ----------------------------------------------------------------------------------------------
# Both scripts draw images the same way (runtime.draw_samples), so a seed gives the same digits from
# either and on any backend. The defaults come from the quality-versus-cost table in docs/results.md.

SAMPLERS = ("ddpm", "ddim", "dpm++2m")   # diffusion.SAMPLERS, spelled out so flags parse before torch loads
DEFAULT_SAMPLER = "dpm++2m"     # 5 steps, 10 network evaluations per digit: as good as DDIM-25/50
DEFAULT_STEPS = 5               # at a fraction of the cost; stronger guidance raises accuracy but
DEFAULT_CFG = 1.2               # worsens FD, weaker the reverse
DEFAULT_NUM_SAMPLES = 64
DEFAULT_BATCH_SIZE = 64         # images per network batch; export.py tunes the engine for twice it (guidance)


def add_sampling_args(parser, default_out):
    """The sampling flags shared by sample.py and infer_trt.py."""
    a = parser.add_argument
    a("--labels", default=None, help='labels to draw, e.g. "2 4 one nine" (one image each)')
    a("--num-samples", type=positive_int, default=None,
      help=f"without --labels: how many images (None: {DEFAULT_NUM_SAMPLES})")
    a("--label-order", default="cycle", choices=("cycle", "random"), help="labels for --num-samples: 0,1,2,... or random")
    a("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help="the sampling loop of diffusion.py")
    a("--steps", type=positive_int, default=DEFAULT_STEPS, help="sampling steps (evenly spaced over the trained T)")
    a("--cfg-scale", type=nonnegative_float, default=DEFAULT_CFG,
      help="classifier-free guidance scale (1 = none; other values double the network batch)")
    a("--eta", type=nonnegative_float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    a("--thresholding", action="store_true", help="dynamic thresholding of x0 (Imagen; the lesson's sampler used it)")
    a("--seed", type=int, default=0, help="seed of the starting noise (and of random labels)")
    a("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="images per network batch (CFG doubles it)")
    a("--nrow", type=positive_int, default=8, help="images per grid row")
    a("--out", default=default_out, help="PNG grid to write; the label names go beside it as .txt")
    a("--device", default=None, help="cpu, cuda, cuda:N for PyTorch (None: cuda if available)")
    a("--threads", type=positive_int, default=None, help="torch CPU threads (None: torch's, one per core)")


def label_table_path(png_path):
    """grid.png -> grid.txt: where the label names of a sampled grid go."""
    return os.path.splitext(os.fspath(png_path))[0] + ".txt"


def check_sampling_args(args):
    """Reject impossible sampling flags with one line each, before any model is loaded."""
    if args.labels is not None and args.num_samples is not None:
        raise UserError("give either --labels or --num-samples, not both")
    check_writable(args.out)
