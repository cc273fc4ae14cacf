"""
Make the sampling-only checkpoint the repository ships from a finished training run.

    python tools/ship_checkpoint.py runs/dit-t4-mnist/ckpt.pt --scores dpm.json ddim50.json \
        --command "python train.py --max-minutes 90 ..." --commit 7b1c5ed --out checkpoints/dit-t4-mnist.pt

Keeps the EMA weights (fp32), both configs and the class names, and adds the training record (command,
commit, steps, images seen, wall time, machine) and the scores of tools/evaluate.py score --out-json.
Drops the optimizer, the raw weights and the RNG states, so it is a third of a training checkpoint and
train.py --resume refuses it (`sampling_only`). The result loads with checkpoint.model_from_checkpoint.
"""
import os
import platform
import sys

if __package__ in (None, ""):          # run from tools/: the repository's modules sit one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import load_checkpoint, save_checkpoint
from cli import ArgumentParser, UserError, run_cli
from evaluate import read_score
from guard import refuse_overwrite

SCORE_KEYS = ("sampler", "steps", "cfg_scale", "n", "accuracy", "per_class_accuracy", "fd", "floor",
              "nfe_per_image", "wall_s", "machine")      # what a score keeps from evaluate.py's JSON
                                                         # (those it has)


def parse_args(argv):
    p = ArgumentParser(description="Turn a training checkpoint into the sampling-only one "
                                   "the repository ships.")
    p.add_argument("ckpt", help="ckpt.pt (or a ckpt_<M>min.pt snapshot) written by train.py")
    p.add_argument("--out", required=True, help="the file to write, e.g. checkpoints/dit-t4-mnist.pt")
    p.add_argument("--scores", nargs="*", default=[], help="JSON files of tools/evaluate.py score --out-json")
    p.add_argument("--command", required=True, help="the training command that made the run, as typed")
    p.add_argument("--commit", required=True, help="the git commit the run was trained from")
    p.add_argument("--machine", default=None, help="where it trained (default: this machine's CPU and cores)")
    return p.parse_args(argv)


def this_machine():
    """'2-core Intel(R) Xeon(R) Processor, Linux': the CPU as /proc/cpuinfo names it."""
    name = platform.processor() or "CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{os.cpu_count()}-core {name}, no GPU, {platform.system()}"


def kept(score):
    return {k: score[k] for k in SCORE_KEYS if k in score}


def main(argv=None):
    args = parse_args(argv)
    refuse_overwrite({"--out": args.out}, {"ckpt": args.ckpt, **{f"--scores {p}": p for p in args.scores}})
    ckpt = load_checkpoint(args.ckpt)
    if ckpt.get("ema") is None or "step" not in ckpt:
        raise UserError(f"{args.ckpt} has no EMA weights or step count; "
                        f"pass a checkpoint written by train.py")
    import torch
    batch = ckpt.get("args", {}).get("batch_size")
    state = {
        "model_config": ckpt["model_config"], "diffusion_config": ckpt["diffusion_config"],
        "model": {k: v.to(torch.float32) for k, v in ckpt["ema"].items()},   # the EMA weights, as "model"
        "weights": "ema", "sampling_only": True,
        "class_names": ckpt.get("class_names"), "dataset": ckpt.get("dataset"), "step": ckpt["step"],
        "wall_time_s": ckpt.get("wall_time_s"),
        "training": {"command": args.command, "commit": args.commit, "steps": ckpt["step"],
                     "images_seen": ckpt["step"] * batch if batch else None, "batch_size": batch,
                     "wall_time_min": round(ckpt.get("wall_time_s", 0.0) / 60, 1),
                     "machine": args.machine or this_machine(), "args": ckpt.get("args", {})},
        "scores": [kept(read_score(p, ("accuracy", "fd"), "--scores ")) for p in args.scores],
    }
    save_checkpoint(args.out, state)
    size = os.path.getsize(args.out) / 1e6
    print(f"{args.out}: step {ckpt['step']}, {len(state['scores'])} scores, {size:.1f} MB (sampling-only)")


if __name__ == "__main__":
    run_cli(main)
