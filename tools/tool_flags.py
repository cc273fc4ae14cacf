"""
The command lines of the tools (bench.py, evaluate.py, plot_curve.py, ship_checkpoint.py) and the score
files they pass between them. PyTorch-free, like the flags at the top of the main scripts, so that their
--help and flag errors answer before PyTorch loads.
"""
import sys

if __name__ == "__main__":      # run by hand: say what this file is, before importing what it needs
    sys.exit(f"{sys.argv[0]}: a module of the tools (their flags), not a script; "
             f"run python tools/evaluate.py or tools/bench.py")

import argparse
import json
import os

from support import (DEFAULT_CFG, DEFAULT_LOWER_ORDER_FINAL, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS,
                     ArgumentParser, UserError, nonnegative_float, nonnegative_int, number_list,
                     positive_float, positive_int)

# ----------------------------------------------------------------------------------------------
#                                          bench.py
# ----------------------------------------------------------------------------------------------

def parse_bench_args(argv):
    p = ArgumentParser(description="Benchmark the DiT's backends against eager fp32 PyTorch.")
    a = p.add_argument
    a("--preset", default=None,
      help="a preset of dit.py, e.g. DiT-S/4 (default DiT-T/4 on CPU, DiT-S/4 on GPU)")
    a("--ckpt", default=None, help="time these trained weights (default: the shipped model; with --preset or "
      "--quick: random weights)")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--threads", type=positive_int, default=None, help="CPU threads (default: torch's, one per core)")
    a("--batch-sizes", type=number_list(positive_int), default=None,
      help="network batch sizes to time (default 8,64 on CPU, 8,64,256 on GPU)")
    a("--backends", default=None,
      help="comma-separated sampling rows (default: all for the device; eager always)")
    a("--train-backends", default=None, help="comma-separated training rows, or none (default: all)")
    a("--repeats", type=positive_int, default=None,
      help="interleaved repeats of evaluation and training timings (default 5)")
    a("--sample-repeats", type=positive_int, default=None,
      help="interleaved repeats of the digit sampling (default 3)")
    a("--warmup", type=nonnegative_int, default=None, help="untimed calls per row before timing (default 2)")
    a("--target-seconds", type=positive_float, default=None,
      help="length of one timed run of evaluations (default 0.3)")
    a("--digits", type=positive_int, default=None, help="digits to sample (default 64)")
    a("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
      help="sampler of the digit timings (sample.py's default)")
    a("--steps", type=positive_int, default=None, help=f"sampler steps (default {DEFAULT_STEPS})")
    a("--cfg-scale", type=nonnegative_float, default=DEFAULT_CFG,
      help="guidance scale of the digit timings (sample.py's default)")
    a("--ddpm", default="estimate", choices=("estimate", "measure", "off"),
      help="DDPM-1000: per-step time x 1000 (estimate), or one real run per row in --ddpm-backends (measure)")
    a("--ddpm-backends", default="eager", help="rows whose DDPM-1000 is measured with --ddpm measure")
    a("--train-batch", type=positive_int, default=None, help="training batch (default 128)")
    a("--onnx", default=None, help="fp32 ONNX of the same weights for the ort row (default: export one)")
    a("--trt-engine", default=None, help="TensorRT engine from export.py (same --ckpt) for the trt row")
    a("--json", default=None, help="also write the results here as JSON")
    a("--quick", action="store_true", help="a tiny model, one batch size, few repeats: seconds, for tests")
    args = p.parse_args(argv)
    defaults = dict(repeats=5, sample_repeats=3, warmup=2, target_seconds=0.3, digits=64, steps=DEFAULT_STEPS,
                    train_batch=128)
    if args.quick:
        defaults.update(repeats=2, sample_repeats=1, warmup=1, target_seconds=0.01, digits=8, steps=4,
                        train_batch=8, batch_sizes=[4])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ----------------------------------------------------------------------------------------------
#                                         evaluate.py
# ----------------------------------------------------------------------------------------------

CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "mnist_cnn.pt")   # = mnist_cnn.CLASSIFIER_PATH
KEPT_SAMPLES = os.path.join("runs", "evaluate-samples.npz")   # where drawn digits go when scoring them fails
DEFAULT_ROWS = "ddpm-1000:13,ddpm-250:20,ddim-100:50,ddim-50,ddim-25,ddim-10,dpm++2m-25,dpm++2m-10"


def parse_evaluate_args(argv):
    parser = ArgumentParser(description="Score generated MNIST digits: conditional accuracy and FD "
                                        "(MNIST-CNN).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-classifier", help="train the MNIST CNN that scores samples")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST IDX files (None: the repository's mnist/)")
    p.add_argument("--epochs", type=positive_int, default=5, help="passes over the 60,000 training digits")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch")
    p.add_argument("--lr", type=positive_float, default=3e-3,
                   help="peak learning rate of the one-cycle schedule")
    p.add_argument("--max-shift", type=nonnegative_int, default=2,
                   help="random shifts of +-N pixels (augmentation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    p.add_argument("--out", required=True, help="where the weights go: a new file (every score in "
                   "docs/results.md used the shipped tools/mnist_cnn.pt, which is never replaced)")
    for name in ("score", "table"):
        p = sub.add_parser(name, help="score one sampler setting" if name == "score" else
                           "grid of sampler settings x CFG scales as a markdown table")
        src = p.add_mutually_exclusive_group() if name == "score" else p
        src.add_argument("--ckpt", help="checkpoint written by train.py (None: the shipped model, "
                         "checkpoints/dit-t4-mnist.pt)")
        if name == "score":
            src.add_argument("--npz", help="score saved digits: arrays 'images' (N,1,32,32) and "
                             "'labels' (N,)")
            p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help="sample.py's default")
            p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="sampling steps")
            p.add_argument("--cfg-scale", type=nonnegative_float, default=DEFAULT_CFG,
                           help="classifier-free guidance scale")
            p.add_argument("--lower-order-final", action=argparse.BooleanOptionalAction,
                           default=DEFAULT_LOWER_ORDER_FINAL,
                           help="dpm++2m: a first-order last step below 15 steps (sample.py's default)")
            p.add_argument("--per-class", type=positive_int, default=1000,
                           help="samples per class (1000: headline)")
            p.add_argument("--save-npz", help="also write the drawn digits to this .npz")
        else:
            p.add_argument("--per-class", type=positive_int, default=100,
                           help="samples per class unless a row says :N")
            p.add_argument("--rows", default=DEFAULT_ROWS, help="SAMPLER-STEPS[:PER_CLASS],...")
            p.add_argument("--cfg-scales", type=number_list(nonnegative_float), default="1.5,2,3,4",
                           help="CFG scales tried besides 1")
            p.add_argument("--sweep-at", default="ddim-25", help="setting at which CFG scales are compared")
            p.add_argument("--margin-fd", type=nonnegative_float, default=0.10,
                           help="relative FD/floor margin of the choice")
            p.add_argument("--margin-acc", type=nonnegative_float, default=0.005,
                           help="accuracy margin (0.005 = 0.5 points)")
            p.add_argument("--out-md", help="also write the table here")
            p.add_argument("--resume", action="store_true", help="reuse the results in --out-json of an "
                           "interrupted run (same ckpt, backend, seed, batch size)")
        p.add_argument("--out-json", help="also write the results here as JSON")
        p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
        p.add_argument("--batch-size", type=positive_int, default=500, help="images per network batch")
        p.add_argument("--backend", choices=("torch", "ort"), default="torch", help="run the network on this")
        p.add_argument("--onnx", help="ONNX file exported from --ckpt, for --backend ort")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (None: CUDA when available)")
        p.add_argument("--data-dir", default=None,
                       help="folder with the MNIST IDX files (None: the repository's mnist/)")
        p.add_argument("--classifier", default=CLASSIFIER, help="the scoring classifier's weights")
        p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (None: torch's)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
#                               plot_curve.py and ship_checkpoint.py
# ----------------------------------------------------------------------------------------------

def parse_plot_curve_args(argv):
    p = ArgumentParser(description="Collect, tabulate and plot quality against training time.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="score JSONs (tools/evaluate.py score --out-json) -> one curve JSON")
    c.add_argument("scores", nargs="+",
                   help="evaluate.py score --out-json files, one per snapshot and sampler")
    c.add_argument("--out", required=True, help="the curve JSON to write")
    c.add_argument("--extend", default=None, help="a curve JSON whose points come first (an earlier run of "
                   "the same recipe, whose checkpoints may be gone)")
    g = sub.add_parser("plot", help="curve JSON -> markdown table on stdout and a PNG")
    g.add_argument("curve", help="the JSON written by collect")
    g.add_argument("--out", required=True, help="the PNG to write")
    return p.parse_args(argv)


def parse_ship_checkpoint_args(argv):
    p = ArgumentParser(description="Turn a training checkpoint into the sampling-only one "
                                   "the repository ships.")
    p.add_argument("ckpt", help="ckpt.pt (or a ckpt_<M>min.pt snapshot) written by train.py")
    p.add_argument("--out", required=True, help="the file to write, e.g. checkpoints/dit-t4-mnist.pt")
    p.add_argument("--scores", nargs="*", default=[], help="JSON files of tools/evaluate.py score --out-json")
    p.add_argument("--command", required=True, help="the training command that made the run, as typed")
    p.add_argument("--commit", required=True, help="the git commit the run was trained from")
    p.add_argument("--machine", default=None, help="where it trained (default: this machine's CPU and cores)")
    return p.parse_args(argv)


def read_score(path, required, flag=""):
    """A score written by `evaluate.py score --out-json` that holds the keys `required`; else a one-line error
    (flag: how the caller's command line names the file, e.g. "--scores ")."""
    try:
        with open(path) as f:
            score = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}{path}: not a readable JSON file ({e}); pass evaluate.py score --out-json "
                        f"files")
    missing = [k for k in required if k not in score] if isinstance(score, dict) else list(required)
    if missing:
        raise UserError(f"{flag}{path} is not a score of a checkpoint (it lacks {', '.join(missing)}); pass "
                        f"evaluate.py score --ckpt ... --out-json files")
    return score
