"""
What every script shares on the command line: the one-line error for bad input, flag types that refuse
impossible numbers, a progress line, and the choice of device.

PyTorch is imported inside the two functions that need it, not at the top, so that recipe.py's flags
parse before torch loads (which takes seconds).
"""
import argparse
import math
import os
import re
import sys
import time


class UserError(Exception):
    """Bad input from the user (path, file, label, flag); str(e) is one line naming the problem and
    the fix."""


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
        what = first_line(e)
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
