"""
The machinery that keeps the work safe, behind one door: none of it is the method, and dit.py, diffusion.py,
train.py, export.py and infer_trt.py read without opening this file.

    the command line      UserError and run_cli (bad input is one line, exit 2), flag types, Progress, devices
    shared flags          the shipped model and export file names, the sampling flags of sample.py,
                          infer_trt.py and the tools
    files                 atomic writes (temp file, fsync, rename), no output over an input
    checkpoints           save and load with a format stamp and a checksum, what a resume checks and restores
    sidecars              <file>.json beside every export: which checkpoint, configs and GPU it came from
    the run folder        its lock and log, the command that continues a run
    DDP                   joining the process group, decisions taken together, every rank's RNG state
    TrainingRun           around each training step: logs, grids, checkpoints, snapshots and clean stops

PyTorch is imported inside the functions that need it, not at the top: the scripts parse their flags with
this module before PyTorch loads (it takes seconds), so `--help` and a mistyped flag answer at once.
"""
import argparse
import contextlib
import csv
import dataclasses
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import warnings

# PyTorch's OpenMP threads spin at every barrier before they sleep. On a machine where another process holds
# a core, the spinning thread keeps the one that has work off it, and a training step gets many times slower.
# Before PyTorch loads (every script imports this module first), and unless the environment chooses: a busy
# machine (a load average of 1 or more: a core's worth of other work) makes the threads wait passively, which
# a note says; on a quiet one they spin at most 10,000 times, as fast as the default there. docs/results.md
# measures each setting (tools/cpu_threads.py).
OPENMP_NOTE = None
def load_average():
    """The 1-minute load average, or 0 where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    if load_average() >= 1.0:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        OPENMP_NOTE = (f"note: this CPU is busy (load average {load_average():.1f} on {os.cpu_count()} "
                       f"cores): PyTorch's threads wait passively (set OMP_WAIT_POLICY=ACTIVE to make them "
                       f"spin)")
    else:
        os.environ["GOMP_SPINCOUNT"] = "10000"


# ----------------------------------------------------------------------------------------------
#                                       The command line
# ----------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input from the user (path, file, label, flag); str(e) is one line naming the problem and
    the fix."""


def first_line(error, limit=160):
    """The first line of an exception's message (or its type's name), cut to `limit` characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|not enough memory",
                           re.IGNORECASE)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal or SSH session), raised where Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum, frame):
    raise Stopped(signum)


def run_cli(main, memory_hint="lower --batch-size"):
    """Run a script's main(); a UserError becomes `script: error: message` and exit status 2, not a traceback.
    Ctrl-C, SIGTERM and SIGHUP are one line and exit status 128 + the signal (every file is written
    atomically, so none is left half-written; work that can keep what it did, keeps it); a full disk and
    running out of memory are one line each, naming what to free or the flag to lower (memory_hint)."""
    global OPENMP_NOTE
    name = os.path.basename(sys.argv[0])
    master = os.environ.get("RANK", "0") == "0"             # under torchrun, rank 0 speaks for all
    previous = {s: signal.signal(s, raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(s) is not signal.SIG_IGN}          # nohup's ignored SIGHUP stays so
    try:
        main()
        if OPENMP_NOTE and master:              # once the flags parsed: a flag error stays one line
            print(OPENMP_NOTE, file=sys.stderr)
        OPENMP_NOTE = None
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if master:
            print(f"{name}: interrupted ({what}); no file was left half-written", file=sys.stderr)
        sys.exit(128 + signum)
    except Exception as e:
        if disk_full(e):
            print(f"{name}: error: no space left on the disk ({first_line(e)}); free some space",
                  file=sys.stderr)
            sys.exit(2)
        if not (isinstance(e, MemoryError) or OUT_OF_MEMORY.search(str(e))):
            raise
        print(f"{name}: error: out of memory ({first_line(e)}); {memory_hint}", file=sys.stderr)
        sys.exit(2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


def minutes_list(text):
    """'10,30,60' -> (10.0, 30.0, 60.0), increasing."""
    minutes = tuple(positive_float(m) for m in text.split(",") if m.strip())
    if list(minutes) != sorted(set(minutes)):
        raise argparse.ArgumentTypeError(f"{text!r}: give increasing minutes, e.g. 10,30,60")
    return minutes


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
        print("\r" + line + "\x1b[K" if self.tty else line, end="" if self.tty else "\n", file=self.file,
              flush=True)

    def close(self):
        if self.tty and self.first:
            print(file=self.file)


def has_fast_bf16(device):
    """Whether a CUDA device computes bf16 natively: compute capability 8 (Ampere) or newer. Earlier GPUs
    (a T4) emulate it, and torch.cuda.is_bf16_supported() counts the emulation, so it cannot decide this."""
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
#                    Shared flags: the shipped files and the sampling flags
# ----------------------------------------------------------------------------------------------

# The trained model the repository ships (train.py's CPU default, EMA weights, its record inside): what the
# sampling, export and measuring scripts use when --ckpt is not given. export.py writes its files for it into
# SHIPPED_EXPORT_DIR, outside the tracked files.
SHIPPED_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "dit-t4-mnist.pt")
SHIPPED_EXPORT_DIR = "runs/shipped"
ONNX_NAME, ENGINE_NAME = "model.onnx", "model_fp16.engine"


def checkpoint_or_shipped(path):
    """--ckpt as given, or (None) the shipped checkpoint, said in one line on stderr."""
    if path is not None:
        return path
    if not os.path.isfile(SHIPPED_CKPT):
        raise UserError(f"no --ckpt given and the shipped model {SHIPPED_CKPT} is missing; pass --ckpt "
                        f"RUN/ckpt.pt")
    print(f"note: no --ckpt given: using the shipped model {os.path.relpath(SHIPPED_CKPT)} "
          f"({describe_checkpoint(SHIPPED_CKPT)})", file=sys.stderr)
    return SHIPPED_CKPT


def describe_checkpoint(path):
    """What a checkpoint file says it is, e.g. "DiT-T/4 trained on mnist, step 26,521"."""
    ckpt = load_checkpoint(path)
    args = (ckpt.get("training") or {}).get("args") or ckpt.get("args") or {}
    c = ckpt["model_config"]
    model = args.get("model") or f"a DiT of width {c.get('hidden_size')} and depth {c.get('depth')}"
    step = ckpt.get("step")
    return f"{model} trained on {ckpt.get('dataset', 'unknown data')}" + (f", step {step:,}" if step else "")


# The sampling flags of sample.py and infer_trt.py (and the tools' defaults), here so that each parses them
# before PyTorch loads. A seed gives the same digits from either script and on any backend.
SAMPLERS = ("ddpm", "ddim", "dpm++2m")   # diffusion.py's, spelled out here (a test keeps the two equal)
# The default sampler, chosen on the shipped model by one rule: the lowest FD at >= 99 % conditional accuracy
# within 20 network evaluations per digit (docs/results.md's sampler sweep). That is DPM-Solver++(2M) in 10
# steps with guidance 1.25 and a first-order last step. Stronger guidance raises accuracy but worsens FD.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_LOWER_ORDER_FINAL = "dpm++2m", 10, 1.25, True
DEFAULT_NUM_SAMPLES = 64
DEFAULT_BATCH_SIZE = 64         # images per network batch; export.py tunes the engine for twice that


def add_sampling_args(parser, default_out):
    """The sampling flags shared by sample.py and infer_trt.py."""
    a = parser.add_argument
    a("--labels", default=None, help='labels to draw, e.g. "2 4 one nine" (one image each)')
    a("--num-samples", type=positive_int, default=None,
      help=f"without --labels: how many images (None: {DEFAULT_NUM_SAMPLES})")
    a("--label-order", default="cycle", choices=("cycle", "random"), help="labels for --num-samples: "
      "0,1,2,... or random")
    a("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help="the sampling loop of diffusion.py")
    a("--steps", type=positive_int, default=DEFAULT_STEPS,
      help="sampling steps (evenly spaced over the trained T)")
    a("--cfg-scale", type=nonnegative_float, default=DEFAULT_CFG,
      help="classifier-free guidance scale (1 = none; other values double the network batch)")
    a("--eta", type=nonnegative_float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    a("--thresholding", action="store_true", help="dynamic thresholding of x0 (Imagen; the lesson's sampler "
      "used it)")
    a("--lower-order-final", action=argparse.BooleanOptionalAction, default=DEFAULT_LOWER_ORDER_FINAL,
      help="dpm++2m: a first-order last step when there are fewer than 15 steps (as diffusers' "
      "lower_order_final)")
    a("--seed", type=int, default=0, help="seed of the starting noise (and of random labels)")
    a("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="images per network batch (CFG "
      "doubles it)")
    a("--nrow", type=positive_int, default=8, help="images per grid row")
    a("--out", default=default_out, help="PNG grid to write; the label names go beside it as .txt")
    a("--device", default=None, help="cpu, cuda, cuda:N for PyTorch (None: cuda if available)")
    a("--threads", type=positive_int, default=None, help="torch CPU threads (None: torch's, one per core)")


SAMPLING_VALUES = ("labels", "num_samples", "label_order", "seed", "sampler", "steps", "cfg_scale", "eta",
                   "thresholding", "batch_size", "lower_order_final")      # what sample.draw_labelled takes


def sampling_values(args):
    """The parsed sampling flags that choose the images, as sample.draw_labelled's keyword arguments."""
    return {k: getattr(args, k) for k in SAMPLING_VALUES}


def check_sampling_args(args):
    """Refuse sampling flags that cannot take effect together, each in one line."""
    if args.labels is not None and args.num_samples is not None:
        raise UserError("give either --labels or --num-samples, not both")
    if args.labels is not None and args.label_order != "cycle":
        raise UserError("--label-order chooses the labels of --num-samples; with --labels it has no effect")
    if args.lower_order_final != DEFAULT_LOWER_ORDER_FINAL and args.sampler != "dpm++2m":
        raise UserError(f"--{'' if args.lower_order_final else 'no-'}lower-order-final is DPM-Solver++(2M)'s "
                        f"and has no effect on --sampler {args.sampler}")
    if args.eta and args.sampler != "ddim":
        raise UserError(f"--eta is DDIM's noise and has no effect on --sampler {args.sampler}; drop it or "
                        f"pass --sampler ddim")
    if args.labels is not None and args.cfg_scale == 0:
        raise UserError("--cfg-scale 0 samples unconditionally, so --labels would not choose the digits; "
                        "raise --cfg-scale, or use --num-samples for unconditional samples")
    return args


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
    write a temp file in the same folder, then move_into_place over the target. A symbolic link is followed
    (the link stays, its target gets the file); a character device (/dev/null) is written through, never
    renamed over; any other existing file that is not a regular one is refused."""
    path = os.path.realpath(path) if os.path.islink(path) else os.fspath(path)
    if is_char_device(path):
        with open(path, "wb" if binary else "w") as f:
            write_fn(f)
        return
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{path} exists and is not a regular file; it is not replaced: give another path")
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
    path = os.path.realpath(path) if os.path.islink(path) else path     # atomic_write writes by the target
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def check_writable(path, flag="the output"):
    """Fail before minutes of work, not after, when the output (given as `flag`) cannot be written: a folder,
    a FIFO or a socket is refused (a character device such as /dev/null is written through); a symbolic link
    is checked where it points, where atomic_write will write."""
    path = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder, not a file; give a file name (inside it, if you like)")
    if os.path.exists(path) and not os.path.isfile(path) and not is_char_device(path):
        raise UserError(f"{flag} {path} exists and is not a regular file; give another path")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"cannot write to {folder}: it is a file, not a folder; choose another {flag}")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror}; choose a writable {flag}") from None


def is_char_device(path):
    return os.path.exists(path) and stat.S_ISCHR(os.stat(path).st_mode)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def image_format(path, flag="--out"):
    """The image format a file name asks for (PNG for a device such as /dev/null); another suffix is refused,
    so that no file holds bytes its name does not say."""
    if is_char_device(path):
        return "PNG"
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in IMAGE_FORMATS:
        raise UserError(f"{flag} {path}: the grid is an image, and {suffix or 'no suffix'} is not an image "
                        f"format; end the name in {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


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


def remove_dead_exports(out_dir):
    """Remove the temp folders of exports that were killed (.export-<pid>-*, the pid not running, or without
    a pid), so that they do not pile up."""
    for name in os.listdir(out_dir):
        match = re.fullmatch(r"\.export-(?:(\d+)-)?\w+", name)
        if not match or not os.path.isdir(os.path.join(out_dir, name)):
            continue
        if match.group(1):
            try:
                os.kill(int(match.group(1)), 0)          # signal 0: only asks whether the process exists
                continue
            except ProcessLookupError:
                pass
            except PermissionError:                       # it exists, owned by someone else
                continue
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
#                            Checkpoints: format, checksum, resume
# ----------------------------------------------------------------------------------------------

# A checkpoint is one torch.save'd dict of tensors and plain values (train.py's save() lists the keys),
# loadable with weights_only=True, so no pickled code can run. save_checkpoint stamps it with a format, a
# version and a SHA-256 of all the rest; load_checkpoint refuses anything else in one line. A sampling-only
# file (tools/ship_checkpoint.py) holds the EMA weights as "model" and no optimizer or RNG state.
CHECKPOINT_FORMAT = "dit-checkpoint"
CHECKPOINT_VERSION = 2          # the version with the checksum; versions 1 (no checksum) and 2 load
RESUME_KEYS = ("ema", "optimizer", "step", "rng")
# Old key -> current key, applied to every config read from a file.
RENAMED = {"timesteps": "timestep_sampling"}


def renamed(config):
    """A stored config or settings dict with today's key names."""
    return {RENAMED.get(k, k): v for k, v in config.items()} if isinstance(config, dict) else config


def config_dict(config):
    """A dataclass config as a plain dict (what checkpoints and sidecars store)."""
    return dataclasses.asdict(config)


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file: identifies the checkpoint an exported ONNX or engine was built from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(value, h=None):
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's repr,
    dict keys in sorted order. A flipped byte anywhere in the weights changes it."""
    h = h or hashlib.sha256()
    if isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            content_sha256(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            content_sha256(item, h)
    elif "torch" in sys.modules and isinstance(value, sys.modules["torch"].Tensor):   # loaded with any tensor
        torch = sys.modules["torch"]
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
    """Load and validate a checkpoint; every way it can be wrong is a one-line UserError. Its configs come
    back with the current key names (RENAMED)."""
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
        raise UserError(f"{path} is not a DiT checkpoint of this project; "
                        f"pass the ckpt.pt written by train.py")
    if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise UserError(f"{path} has checkpoint format version {ckpt.get('version')}, this code reads "
                        f"versions 1-{CHECKPOINT_VERSION}; retrain or use the matching code version")
    if ckpt["version"] >= 2 and ckpt.pop("sha256", None) != content_sha256(ckpt):
        raise UserError(f"{path} is damaged: its content does not match its checksum (a changed or flipped "
                        f"byte); use an intact copy or an earlier checkpoint")
    missing = [k for k in ("model_config", "diffusion_config", "model") if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it is incomplete, use another checkpoint")
    for key in ("diffusion_config", "args"):
        if key in ckpt:
            ckpt[key] = renamed(ckpt[key])
    return ckpt


def checkpoint_to_resume(resume, ckpt_path, say):
    """--resume PATH, or auto (OUT/ckpt.pt if it exists), or None -> the file to resume or None. A run folder
    that holds a checkpoint is never started over."""
    path = ckpt_path if resume == "auto" else resume
    if os.path.exists(ckpt_path) and not (path and same_file(path, ckpt_path)):
        raise UserError(f"{ckpt_path} exists: this folder holds a run; continue it with --resume auto, "
                        f"or pass another --out for a new one")
    if resume == "auto" and not os.path.exists(ckpt_path):
        say(f"--resume auto: no {ckpt_path} yet, starting a new run")
        return None
    return path or None


# Settings that say how a run goes on, not what it learns: a resume may change them without a word.
RUN_SETTINGS = {"out", "resume", "device", "threads", "steps", "max_minutes", "snapshot_minutes", "log_every",
                "sample_every", "sample_cfg", "ckpt_every", "ddp_timeout", "compile", "seed", "lesson_recipe"}


def load_for_resume(path, configs, defaults, data, settings, say):
    """Load a checkpoint to continue training. Its configs must equal the flags' ones (configs: {"model":
    dict, "diffusion": dict}): a resume continues the run the flags describe, and silently taking the
    checkpoint's could ignore one. A field newer than the checkpoint counts as its default (defaults: the
    same layout). Its data must be the same (data: (dataset name, class names)); the recipe settings that
    differ from the checkpoint's (settings: train.py's, as a dict) are said in one line."""
    ckpt = load_checkpoint(path)
    if ckpt.get("sampling_only"):
        raise UserError(f"{path} is a sampling-only checkpoint (EMA weights, no optimizer or RNG state): it "
                        f"cannot be resumed; sample or export from it, or train a new run without --resume")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it cannot be resumed (sample from it instead)")
    dataset, class_names = data
    if (ckpt.get("dataset"), ckpt.get("class_names")) != (dataset, class_names):
        raise UserError(f"{path} was trained on {ckpt.get('dataset')} with classes "
                        f"{ckpt.get('class_names')}, not on {dataset} with {class_names}; resume with its "
                        f"--dataset and --data-dir, or start a new run with another --out")
    theirs_all = ({**defaults["model"], **ckpt["model_config"]},
                  {**defaults["diffusion"], **ckpt["diffusion_config"]})
    for (what, mine), theirs in zip(configs.items(), theirs_all):
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, flags {v!r}" for k, v in mine.items()
                if theirs.get(k) != v]
        if diff:
            raise UserError(f"{path} was trained with another {what} config ({'; '.join(diff)}); resume with "
                            f"the flags of the run that wrote it")
    before = ckpt.get("args") or {}
    run_only = RUN_SETTINGS - ({"steps"} if settings.get("decay_steps") else set())   # steps time the decay
    changed = [f"--{k.replace('_', '-')} {before[k]} -> {v}" for k, v in settings.items()
               if k in before and k not in run_only and before[k] != v]
    if changed:
        say(f"note: resuming with other settings than the checkpoint's: {', '.join(changed)}")
    return ckpt


def restore_rng_states(rng, batch_rng, rank, device):
    """Put a checkpoint's RNG states back: the batch generator's, and this rank's global one (it draws the
    label dropout). A run resumed on more ranks reuses the first states."""
    import torch
    ranks = rng["ranks"]
    own = ranks[rank % len(ranks)]
    torch.set_rng_state(own["torch"])
    if device.type == "cuda" and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], device)
    batch_rng.set_state(rng["data"])


# ----------------------------------------------------------------------------------------------
#                        Sidecars: what an exported file was built from
# ----------------------------------------------------------------------------------------------

SIDECAR_FORMAT = "dit-export"
SIDECAR_VERSION = 2            # version 2 carries the sidecar's own checksum


def sidecar_path(artifact):
    return os.fspath(artifact) + ".json"


def sidecar_sha256(meta):
    """Checksum of a sidecar's own content (all but this field), so an edited sidecar is refused."""
    content = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def artifact_sha256(artifact):
    """SHA-256 of an exported file, and of its external weights (`<file>.data`) when it has them."""
    digest = file_sha256(artifact)
    data = os.fspath(artifact) + ".data"
    return digest + ("+" + file_sha256(data) if os.path.isfile(data) else "")


def place_with_sidecar(path, target, meta):
    """Move a checked file and its sidecar into place together: the sidecar is written complete beside the
    file first (a full disk stops there, with nothing moved), then both are renamed, which takes no space."""
    for final in (target, sidecar_path(target)):
        if os.path.lexists(final) and not os.path.isfile(final) or os.path.islink(final):
            raise UserError(f"{final} exists and is not a regular file; it is not replaced: give another "
                            f"--out-dir")
    write_sidecar(path, meta, name=os.path.basename(target))
    move_into_place(path, target)
    move_into_place(sidecar_path(path), sidecar_path(target))


def write_sidecar(artifact, meta, name=None):
    """Write `<artifact>.json`: meta, the artifact's hash (a file swapped after export is refused) and the
    sidecar's own checksum (so are hand-edited configs or class names, which would sample wrong images).
    name: the file name the artifact will have, when it is written under a temporary one."""
    meta = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
            "artifact": name or os.path.basename(artifact),
            "artifact_sha256": artifact_sha256(artifact), **meta}
    meta["sidecar_sha256"] = sidecar_sha256(meta)
    atomic_write(sidecar_path(artifact), lambda f: json.dump(meta, f, indent=1), binary=False)
    return meta


def load_sidecar(artifact):
    """Read the sidecar of an ONNX file or engine; a missing or unreadable one is a one-line UserError."""
    artifact = os.fspath(artifact)
    if not os.path.isfile(artifact):
        raise UserError(f"{artifact} does not exist; run `python export.py --ckpt RUN/ckpt.pt` first")
    path = sidecar_path(artifact)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing, so {artifact} cannot be matched to a checkpoint; "
                        f"rerun export.py to write both")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable sidecar ({type(e).__name__}); rerun export.py") from None
    if (not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT
            or meta.get("version") != SIDECAR_VERSION):
        raise UserError(f"{path} is not a sidecar written by this export.py (format {SIDECAR_FORMAT} "
                        f"v{SIDECAR_VERSION}); rerun export.py")
    if meta.get("sidecar_sha256") != sidecar_sha256(meta):
        raise UserError(f"{path} was changed after export (its checksum does not match its content); "
                        f"rerun export.py")
    meta["diffusion_config"] = renamed(meta.get("diffusion_config"))
    return meta


def check_sidecar(meta, artifact, ckpt_path=None, gpu_name=None):
    """Refuse an artifact that changed after export, comes from another checkpoint (ckpt_path: its hash is
    compared) or, for an engine, was built on another GPU (gpu_name: the GPU it is about to run on)."""
    artifact = os.fspath(artifact)
    if artifact_sha256(artifact) != meta.get("artifact_sha256"):
        recorded, data = str(meta.get("artifact_sha256")), artifact + ".data"
        if "+" not in recorded and os.path.isfile(data) and file_sha256(artifact) == recorded:
            raise UserError(f"{data} does not belong to {artifact}, "
                            f"which was exported with its weights inside it; delete {data}")
        raise UserError(f"{artifact} differs from the file its sidecar describes (replaced after export?); "
                        f"rerun export.py")
    source = meta.get("checkpoint", {})
    fix = f"rerun `python export.py --ckpt {ckpt_path}`" if ckpt_path else "rerun export.py"
    if ckpt_path is not None:
        digest = file_sha256(ckpt_path)
        if digest != source.get("sha256") and source.get("path") == os.path.abspath(ckpt_path):
            raise UserError(f"{ckpt_path} changed since {artifact} was exported from it (sha256 "
                            f"{str(source.get('sha256'))[:12]} then, {digest[:12]} now); {fix}")
        if digest != source.get("sha256"):
            raise UserError(f"{artifact} was exported from checkpoint {source.get('path')} "
                            f"(sha256 {str(source.get('sha256'))[:12]}), not from {ckpt_path} "
                            f"(sha256 {digest[:12]}); {fix}")
    built_on = (meta.get("gpu") or {}).get("name")
    if meta.get("kind") == "engine" and gpu_name is not None and built_on != gpu_name:
        raise UserError(f"{artifact} was built for GPU {built_on!r}, this machine has {gpu_name!r}; "
                        f"TensorRT engines only run on the GPU they were built for: rerun export.py here")


# ----------------------------------------------------------------------------------------------
#                               The run folder, its lock and log
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


def resume_command(argv, out, world=1):
    """The command that continues a run: its own flags, with --resume auto --out OUT (under torchrun with as
    many processes as it had)."""
    kept, skip = [], False
    for a in argv:
        if skip or a in ("--resume", "--out") or a.startswith(("--resume=", "--out=")):
            skip = a in ("--resume", "--out")
            continue
        kept.append(a)
    launcher = f"torchrun --nproc_per_node={world} train.py" if world > 1 else "python train.py"
    return " ".join([launcher, *map(shlex.quote, kept), "--resume auto --out", shlex.quote(out)])


class RunLock:
    """An exclusive lock on a folder while a run or an export writes to it (fcntl.flock). A run locks the file
    OUT/.lock, which names the holder (pid, host, start time) for the message a second run gets; an export
    (what="export") locks the folder itself, leaving no file behind.

    The kernel drops the lock when its process ends, however it ends, so a killed run leaves no stale lock:
    the next run takes it over."""

    def __init__(self, folder, what="run"):
        os.makedirs(folder, exist_ok=True)
        if what == "run":
            self.fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        else:
            self.fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = (os.read(self.fd, 300).decode(errors="replace").strip() if what == "run" else "") \
                or f"another {what}"
            os.close(self.fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):      # e.g. ENOLCK: this file system has no locks
                raise UserError(f"cannot lock {folder} ({e.strerror}); pass an "
                                f"{'--out' if what == 'run' else '--out-dir'} on a local disk") from None
            raise UserError(f"{folder} is in use by {holder}; wait for it to end, stop it, or pass another "
                            f"{'--out' if what == 'run' else '--out-dir'}") from None
        if what != "run":
            return
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
    import torch
    import torch.distributed as dist
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
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (t if op == "max" else t / world).tolist()


def rng_states(batch_rng, world, device):
    """The RNG states a checkpoint holds, the inverse of restore_rng_states: the batch generator's, and every
    rank's global one (it draws the label dropout), in rank order. world=1 keeps this rank's only."""
    import torch
    import torch.distributed as dist
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    states = [state]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, {k: v.cpu() for k, v in state.items()})
    return {"data": batch_rng.get_state(), "ranks": states}


# ----------------------------------------------------------------------------------------------
#                            Around each step of the training loop
# ----------------------------------------------------------------------------------------------

class StopFlag:
    """SIGINT, SIGTERM and SIGHUP (a dropped SSH session) set .signum: a long loop finishes its step, saves
    and exits. A second SIGINT or SIGTERM acts as it would have without this. `message` is printed at once on
    Ctrl-C (SIGINT), so that the user knows it was heard. A signal the process ignores (SIGHUP under nohup)
    stays ignored."""

    def __init__(self, message=None):
        self.signum, self.message = None, message
        signals = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                   if signal.getsignal(s) is not signal.SIG_IGN]
        self.previous = {s: signal.signal(s, self.handle) for s in signals}

    def handle(self, signum, frame):
        self.signum = signum
        if signum == signal.SIGHUP:
            # The terminal is gone: writing to it would fail (EIO) before the checkpoint is saved, and the
            # shell may send SIGHUP again as it exits, which changes nothing.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    if stream.isatty():
                        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            return
        signal.signal(signum, self.previous[signum])
        if self.message and signum == signal.SIGINT:
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def every(step, interval):
    """Whether `step` is a multiple of a --*-every interval (0: never)."""
    return bool(interval) and step % interval == 0


class TrainingRun:
    """Everything around the training loop's steps, decided the same way on every DDP rank: log rows and the
    progress line (the loss averaged over ranks; images/s of every step since the last row, a skipped fp16 one
    too, with grids and checkpoints not counted), progress grids, checkpoints and timed snapshots at their
    intervals, and stops: a signal or --max-minutes save and stop; a NaN loss or a full disk end the run with
    one line naming the last good checkpoint. Use as a context manager.

    settings: train.py's (steps, batch_size, max_minutes, snapshot_minutes, log_every, sample_every,
    ckpt_every). save(path, step, wall, rng=None) writes a checkpoint: every rank calls it, each adding its
    RNG state, unless rng is given. grid(path) draws a progress grid; rank 0 only. t_start: when train() began
    (the clock of --max-minutes); wall_before: the run's wall time before this process, for a resumed run.

    Under DDP, when another rank dies or stops answering (torchrun then sends SIGTERM), rank 0 saves the last
    step every rank finished on its own: the weights, EMA and optimizer are the same on every rank, and it
    keeps the batch generator's state of that step; the other ranks' global RNG states (label dropout) are
    lost, so the resumed run reuses rank 0's and is not bit-exact."""

    def __init__(self, out, settings, *, ckpt_path, step, t_start, wall_before, world, device, rank, save,
                 grid, last_good, batch_rng):
        self.out, self.settings, self.ckpt_path, self.first_step = out, settings, ckpt_path, step
        self.batch_rng, self.saved_step, self.finished = batch_rng, step, None
        self.t_start, self.wall_before = t_start, wall_before
        self.world, self.device, self.master = world, device, rank == 0
        self.save, self.grid, self.last_good = save, grid, last_good
        self.snapshots = [m for m in settings.snapshot_minutes or () if 60 * m > wall_before]   # still ahead
        self.stopping, self.progress, self.log, self.stop_flag = False, None, None, None
        self.losses, self.steps_in_row, self.skipped, self.t_row, self.note = [], 0, 0, time.time(), ""

    def __enter__(self):
        s = self.settings
        self.stop_flag = StopFlag("stopping after this step, with a checkpoint (Ctrl-C again to abort)"
                                  if self.master else None)
        try:
            if self.master:
                left = 60 * s.max_minutes - (time.time() - self.t_start) if s.max_minutes else None
                budget = f"--max-minutes {s.max_minutes:g}" if s.max_minutes else None
                self.progress = Progress(s.steps, "step ", time_limit=left, file=sys.stdout, budget=budget)
            self.t_row = time.time()
            self.log = RunLog(os.path.join(self.out, "log.csv"), self.first_step) if self.master else None
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)      # closes what is open; a full disk: the one line
            raise
        return self

    def wall(self):
        """The run's wall time in seconds: this process's and that of the runs it resumed."""
        return self.wall_before + time.time() - self.t_start

    def after_step(self, step, loss_value, lr, step_skipped, fp16):
        """After optimizer step `step`: agree over ranks on NaN, stop and snapshot; then the log row, grid,
        checkpoint and snapshot that are due. Returns whether the run stops now (fp16: the GradScaler skips
        non-finite steps, so a NaN loss is not an error there)."""
        s = self.settings
        if self.world > 1:     # what rank 0 saves if a peer dies in a collective from here to the next step
            self.finished = (step, self.wall(), rng_states(self.batch_rng, 1, self.device))
        timed_out = s.max_minutes is not None and time.time() - self.t_start > 60 * s.max_minutes
        bad = not math.isfinite(loss_value) and not fp16
        snapshot = bool(self.snapshots) and self.wall() >= 60 * self.snapshots[0]
        stop = self.stop_flag.signum is not None or timed_out
        bad, self.stopping, snapshot = over_ranks([bad, stop, snapshot], "max", self.world, self.device)
        if bad:
            raise UserError(f"loss became {loss_value} at step {step}; "
                            f"last good checkpoint: {self.last_good}; lower --lr or use --amp off")
        self.steps_in_row += 1
        self.skipped += step_skipped
        if math.isfinite(loss_value):
            self.losses.append(loss_value)
        end, wall = self.stopping or step == s.steps, self.wall()
        row = end or every(step, s.log_every)
        if row:
            self.write_row(step, lr, wall)
        if self.master:
            self.progress.update(step, self.note, force=row)
        t_pause = time.time()                          # grids and checkpoints do not count against images/s
        if self.master and (end or every(step, s.sample_every)):
            self.grid(os.path.join(self.out, "samples", f"step_{step:07d}.png"))
        if end or every(step, s.ckpt_every):
            self.save(self.ckpt_path, step, wall)
            self.last_good, self.saved_step = f"{self.ckpt_path} (step {step})", step
        if snapshot:
            self.save(os.path.join(self.out, f"ckpt_{self.snapshots.pop(0):g}min.pt"), step, wall)
        self.t_row += time.time() - t_pause
        return self.stopping

    def write_row(self, step, lr, wall):
        """The rank-mean loss into log.csv and the progress note; starts the next row's count."""
        mean = sum(self.losses) / max(len(self.losses), 1)
        (mean_loss,) = over_ranks([mean], "mean", self.world, self.device)
        images_per_s = self.settings.batch_size * self.steps_in_row / max(time.time() - self.t_row, 1e-9)
        self.note = (f" | loss {mean_loss:.4f} | {images_per_s:.0f} img/s | lr {lr:.2e}"
                     + (f" | {self.skipped} fp16 steps skipped" if self.skipped else ""))
        if self.master:
            self.log.write(step, mean_loss, lr, images_per_s, wall)
        self.losses, self.steps_in_row, self.t_row = [], 0, time.time()

    @property
    def signum(self):
        """The signal that stopped the run, or None."""
        return self.stop_flag.signum

    def summary(self, step):
        """How the run ended, in one line."""
        if self.signum is not None:
            why = f"stopped by {signal.Signals(self.signum).name}"
        else:
            why = (f"stopped after --max-minutes {self.settings.max_minutes}" if step < self.settings.steps
                   else "done")
        return (f"{why} at step {step} ({self.wall() / 60:.1f} min in all); checkpoint {self.ckpt_path}, "
                f"grids in {os.path.join(self.out, 'samples')}")

    def __exit__(self, kind, error, trace):
        if (isinstance(error, RuntimeError) and self.master and self.finished and peer_lost(error)
                and self.finished[0] > self.saved_step):
            # Saved before the signal handlers go: torchrun waits after its SIGTERM before it kills.
            step, wall, rng = self.finished
            self.save(self.ckpt_path, step, wall, rng=rng)
            error.saved = f" and rank 0 saved step {step} alone (the resumed run will not be bit-exact)"
        self.stop_flag.restore()
        if self.progress:
            self.progress.close()
        if self.log:
            self.log.close()
        if error is not None and disk_full(error):
            raise DiskFull(f"no space left on the disk of {self.out}; last good checkpoint: "
                           f"{self.last_good}; free some space, then --resume auto") from None
        return False
