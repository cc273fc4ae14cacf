"""
How PyTorch's OpenMP threads behave on a quiet CPU and on one that another process keeps busy: a short
training run and a sampling run of the shipped model, once per OpenMP setting, each in a fresh process
(OpenMP reads its settings when PyTorch loads).

    python tools/cpu_threads.py                  # quiet, then with one busy process beside it
    python tools/cpu_threads.py --steps 100 --conditions busy

Settings: the scripts' own choice (support.py's, unless the environment sets one), OpenMP's default spinning,
OMP_WAIT_POLICY=PASSIVE, and GOMP_SPINCOUNT=10000 / 1000 (a bounded spin). The busy condition starts one
process that spins on a core for as long as the runs take.
"""
import csv
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):          # run as a script: the repository's modules, one folder up
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from support import ArgumentParser, positive_int, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENMP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# GNU OpenMP (PyTorch's on Linux) spins 300,000 times at a barrier by default before it sleeps.
SETTINGS = {"the scripts' choice": {}, "OpenMP's default": {"GOMP_SPINCOUNT": "300000"},
            "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
            "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"}}


def run(argv, env):
    """Run a script of the repository in a fresh process -> (wall seconds, its stdout and stderr)."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()[-300:]}")
    return time.perf_counter() - start, r.stdout + r.stderr


def measure(env, steps, folder):
    """Training images/s (the mean of log.csv's rows after the first, which holds the start-up) and seconds
    for 64 digits with the default sampler."""
    out = os.path.join(folder, f"run{time.monotonic_ns()}")
    run(["train.py", "--steps", str(steps), "--batch-size", "32", "--compile", "off", "--log-every", "25",
         "--sample-every", "0", "--ckpt-every", "0", "--out", out], env)
    with open(os.path.join(out, "log.csv")) as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f)][1:]
    seconds, _ = run(["sample.py", "--num-samples", "64", "--out", os.path.join(folder, "g.png")], env)
    return sum(rates) / len(rates), seconds


def main(argv=None):
    p = ArgumentParser(description="Training and sampling speed under each OpenMP setting, quiet and busy.")
    p.add_argument("--steps", type=positive_int, default=200, help="training steps per run (batch 32, eager)")
    p.add_argument("--conditions", default="quiet,busy", help="quiet, busy, or both")
    args = p.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if k not in OPENMP}
    print(f"load average before: {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    print("| condition | OpenMP setting | training images/s | 64 digits, s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for condition in args.conditions.split(","):
            busy = condition == "busy"
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for name, extra in SETTINGS.items():
                    rate, seconds = measure({**base, **extra}, args.steps, folder)
                    print(f"| {condition} | {name} | {rate:.0f} | {seconds:.1f} |", flush=True)
            finally:
                if hog:
                    hog.kill()


if __name__ == "__main__":
    run_cli(main)
