"""
Make the sampling-only checkpoint the repository ships from a finished training run.

    python tools/ship_checkpoint.py runs/dit-t4-mnist/ckpt.pt --scores dpm.json ddim50.json \
        --command "python train.py --max-minutes 90 ..." --commit 7b1c5ed --out checkpoints/dit-t4-mnist.pt

Keeps the EMA weights (fp32), both configs and the class names, and adds the training record (command,
commit, steps, images seen, wall time, machine) and the scores of tools/evaluate.py score --out-json.
Drops the optimizer, the raw weights and the RNG states, so it is a third of a training checkpoint and
train.py --resume refuses it (`sampling_only`). The result loads with sample.model_from_checkpoint.
"""
import os
import platform
import sys

if __package__ in (None, ""):          # run as a script: the repository's modules, one folder up, and ours
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

from tool_flags import parse_ship_checkpoint_args, read_score
from support import UserError, run_cli

if __name__ == "__main__":
    run_cli(lambda: parse_ship_checkpoint_args(sys.argv[1:]))   # --help answers before PyTorch loads

import torch

from support import load_checkpoint, refuse_overwrite, save_checkpoint

# What a score keeps from evaluate.py's JSON (those it has).
SCORE_KEYS = ("sampler", "steps", "cfg_scale", "lower_order_final", "n", "accuracy", "per_class_accuracy",
              "fd", "floor", "nfe_per_image", "wall_s", "machine")


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
    args = parse_ship_checkpoint_args(argv)
    refuse_overwrite({"--out": args.out}, {"ckpt": args.ckpt, **{f"--scores {p}": p for p in args.scores}})
    ckpt = load_checkpoint(args.ckpt)
    if ckpt.get("sampling_only"):
        raise UserError(f"{args.ckpt} is already a sampling-only checkpoint (made by ship_checkpoint.py); "
                        f"pass the run's ckpt.pt or a ckpt_<M>min.pt snapshot")
    if ckpt.get("ema") is None or "step" not in ckpt:
        raise UserError(f"{args.ckpt} has no EMA weights or step count; "
                        f"pass a checkpoint written by train.py")
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
