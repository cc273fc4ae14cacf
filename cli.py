"""
What every script shares on the command line and on disk: the one-line error for bad input, the
sampling flags, and files written so that a crash never leaves half of one (atomic writes,
checkpoints, PNG grids).

PyTorch is imported inside the few functions that need it, not at the top, so that a script can
parse its flags with this module before it loads torch.
"""
import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
from PIL import Image


class UserError(Exception):
    """Bad input from the user (path, file, label, flag); str(e) is one line naming the problem and the fix."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `script: error: message` and exit status 2, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: a flag error is one line (`prog: error: ...`, exit
    status 2) without the usage block, and --help shows every flag's default."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kwargs})

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

    def __init__(self, total, what="", start=0, time_limit=None, every=30.0, file=None):
        self.total, self.what, self.start, self.time_limit, self.every = total, what, start, time_limit, every
        self.file = file or sys.stderr
        self.tty = self.file.isatty()
        self.t0, self.last, self.shown = time.monotonic(), -float("inf"), False

    def update(self, done, note="", force=False):
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else self.every):
            return
        elapsed, self.last, self.shown = now - self.t0, now, True
        fraction, rate = done / self.total, (done - self.start) / max(elapsed, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        if self.time_limit is not None:
            fraction, left = max(fraction, elapsed / self.time_limit), min(left, max(self.time_limit - elapsed, 0))
        line = (f"{self.what}{done}/{self.total} ({min(fraction, 1):.0%}){note} | {duration(elapsed)} elapsed, "
                + (f"{duration(left)} left" if left < float("inf") else "time left unknown"))
        print("\r" + line + "\x1b[K" if self.tty else line, end="" if self.tty else "\n", file=self.file, flush=True)

    def close(self):
        if self.tty and self.shown:
            print(file=self.file)


def pick_device(name=None):
    """--device value -> torch.device; default: CUDA when available, else CPU."""
    import torch
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None


# ----------------------------------------------------------------------------------------------
#                                  Files that survive a crash
# ----------------------------------------------------------------------------------------------

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
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path):
    """Fail before minutes of work, not after, when the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"cannot write to {folder}: it is a file, not a folder; choose another output path")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror}; choose a writable output path") from None


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file: identifies the checkpoint an exported ONNX or engine was built from."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
#                                         Checkpoints
# ----------------------------------------------------------------------------------------------
# A checkpoint is one torch.save'd dict of tensors and plain Python values, loadable with
# weights_only=True (no pickled code can run), that holds everything needed to rebuild the model:
#   format, version       what this file is, so a foreign .pt is refused with a clear message
#   model_config          DiTConfig as a dict
#   diffusion_config      DiffusionConfig as a dict
#   model, ema            state dicts (ema = the exponential moving average used for sampling)
#   class_names           label names of the training set (["0", ..., "9"] for MNIST)
#   step, optimizer, rng, args, ...   training state for --resume (train.py adds what it needs)
# runtime.model_from_checkpoint turns one back into a DiT.

CHECKPOINT_FORMAT = "dit-checkpoint"
CHECKPOINT_VERSION = 1


def config_dict(config):
    """A dataclass config as a plain dict (what checkpoints and sidecars store)."""
    return dataclasses.asdict(config)


def save_checkpoint(path, state):
    """Save a checkpoint dict atomically, stamped with the format and version."""
    import torch
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; every way it can be wrong is a one-line UserError."""
    import torch
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass the ckpt.pt written by train.py")
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
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint format version {ckpt.get('version')}, this code reads "
                        f"version {CHECKPOINT_VERSION}; retrain or use the matching code version")
    missing = [k for k in ("model_config", "diffusion_config", "model") if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it is incomplete, use another checkpoint")
    return ckpt


# ----------------------------------------------------------------------------------------------
#                                    Image grids and labels
# ----------------------------------------------------------------------------------------------

def to_uint8(images):
    """Float images in [-1, 1] -> uint8 [0, 255], same shape; samples overshoot a little, so clamp first."""
    return ((images.detach().float() + 1) * 127.5).clamp(0, 255).round().byte()


def image_grid(images, nrow=8, padding=2):
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image, nrow images per row, black padding."""
    x = to_uint8(images).cpu().permute(0, 2, 3, 1).numpy()                # (N, H, W, C)
    n, h, w, c = x.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = x[k]
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(images, path, nrow=8):
    """Write images as a PNG grid atomically; an unwritable path is a one-line UserError."""
    grid = image_grid(images, nrow)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))


def write_label_table(labels, class_names, png_path, nrow):
    """The label names beside the grid (grid.png -> grid.txt), one line per grid row, like the lesson's
    prompt table. Returns the .txt path."""
    names = [class_names[i] for i in labels]
    table = "\n".join(" ".join(names[r:r + nrow]) for r in range(0, len(names), nrow)) + "\n"
    txt_path = os.path.splitext(png_path)[0] + ".txt"
    atomic_write(txt_path, lambda f: f.write(table), binary=False)
    return txt_path


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def parse_labels(text, class_names):
    """'2 4 one nine' -> [2, 4, 1, 9]. Accepts class indices, class names (case-insensitive) and, for
    digit datasets, English number words; separators are spaces and commas."""
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    if len(class_names) <= len(DIGIT_WORDS):
        lookup.update({w: i for i, w in enumerate(DIGIT_WORDS[:len(class_names)])})
    labels = []
    for token in text.replace(",", " ").split():
        word = token.lower()
        if word.lstrip("-").isdigit():
            i = int(word)
            if not 0 <= i < len(class_names):
                raise UserError(f"label {token} is out of range: this model has classes 0-{len(class_names) - 1}")
        elif word in lookup:
            i = lookup[word]
        else:
            raise UserError(f"unknown label {token!r}: use a class number 0-{len(class_names) - 1} or a name "
                            f"such as {', '.join(repr(n) for n in list(lookup)[:3])}")
        labels.append(i)
    if not labels:
        raise UserError("no labels given; pass e.g. --labels '7 seven 3'")
    return labels


# ----------------------------------------------------------------------------------------------
#                         The sampling flags of sample.py and infer_trt.py
# ----------------------------------------------------------------------------------------------
# Both scripts draw images the same way (runtime.draw_samples), so a seed gives the same digits from
# either and on any backend. The defaults come from the quality-versus-cost table in docs/results.md.

SAMPLERS = ("ddpm", "ddim", "dpm++2m")   # diffusion.SAMPLERS, spelled out so flags parse before torch loads
DEFAULT_SAMPLER = "dpm++2m"     # 5 steps at CFG 1.25, 10 network evaluations per digit: as good as
DEFAULT_STEPS = 5               # DDIM-25/50 at a fraction of the cost; stronger guidance raises accuracy
DEFAULT_CFG = 1.25              # but worsens FD
DEFAULT_NUM_SAMPLES = 64


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
    a("--batch-size", type=positive_int, default=64, help="images per network batch (CFG doubles it)")
    a("--nrow", type=positive_int, default=8, help="images per grid row")
    a("--out", default=default_out, help="PNG grid to write; the label names go beside it as .txt")
    a("--device", default=None, help="cpu, cuda, cuda:N for PyTorch (None: cuda if available)")
    a("--threads", type=positive_int, default=None, help="torch CPU threads (None: torch's, one per core)")


def check_sampling_args(args):
    """Reject impossible sampling flags with one line each, before any model is loaded."""
    if args.labels is not None and args.num_samples is not None:
        raise UserError("give either --labels or --num-samples, not both")
    check_writable(args.out)
