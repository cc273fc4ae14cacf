"""
Draw class-conditional samples from a checkpoint written by train.py into a PNG grid.

    python sample.py --ckpt runs/cpu-t4/ckpt.pt --labels "2 4 one nine 2 eight 7 9" --out grid.png
    python sample.py --ckpt RUN/ckpt.pt --num-samples 64 --label-order cycle --sampler dpm++2m --steps 20

Labels are class numbers, class names or (for digit datasets) English words ("7", "seven").
Beside grid.png goes grid.txt: the label names, one line per grid row (the seed lesson's prompt table).
Sampling uses the EMA weights unless --no-ema. Noise for all images is drawn up front from one
CPU generator seeded with --seed, so a seed gives the same images whatever --batch-size or device
(exactly so for the deterministic samplers: ddim with eta 0, dpm++2m).
"""
import argparse
import os

import torch

from common import UserError, atomic_write, model_from_checkpoint, parse_labels, pick_device, run_cli, save_grid
from diffusion import SAMPLERS

# Defaults; the sampler study measures these and updates them here.
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 25
DEFAULT_CFG = 2.0
DEFAULT_ETA = 0.0
DEFAULT_SEED = 0
DEFAULT_NUM_SAMPLES = 64


def parse_args(argv):
    p = argparse.ArgumentParser(description="Sample a grid of digits (or any classes) from a DiT checkpoint.")
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint written by train.py (RUN/ckpt.pt)")
    a("--labels", default=None, help='labels to draw, e.g. "2 4 one nine" (one image each)')
    a("--num-samples", type=int, default=None, help=f"without --labels: how many images (default {DEFAULT_NUM_SAMPLES})")
    a("--label-order", default="cycle", choices=("cycle", "random"), help="labels for --num-samples: 0,1,2,... or random")
    a("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    a("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (evenly spaced over the trained T)")
    a("--cfg-scale", type=float, default=DEFAULT_CFG, help="classifier-free guidance scale (1 = none)")
    a("--eta", type=float, default=DEFAULT_ETA, help="DDIM noise: 0 deterministic, 1 like DDPM")
    a("--thresholding", action="store_true", help="dynamic thresholding of x0 (Imagen; the seed's sampler used it)")
    a("--seed", type=int, default=DEFAULT_SEED)
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--batch-size", type=int, default=64, help="images per network batch (CFG doubles it)")
    a("--nrow", type=int, default=8, help="images per grid row")
    a("--no-ema", action="store_true", help="use the raw trained weights instead of their EMA")
    a("--out", default="samples.png", help="PNG grid to write; the label names go beside it as .txt")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "nrow"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.num_samples is not None and args.num_samples <= 0:
        raise UserError(f"--num-samples must be > 0, got {args.num_samples}")
    if args.labels is not None and args.num_samples is not None:
        raise UserError("give either --labels or --num-samples, not both")
    if args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {args.out}: folder {folder} does not exist or is not writable; pass another --out")
    return args


def choose_labels(args, class_names, generator):
    """--labels text, or --num-samples labels in cycle / random order -> list of class indices."""
    if args.labels is not None:
        return parse_labels(args.labels, class_names)
    n, k = args.num_samples or DEFAULT_NUM_SAMPLES, len(class_names)
    if args.label_order == "cycle":
        return [i % k for i in range(n)]
    return torch.randint(k, (n,), generator=generator).tolist()


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, diffusion, class_names, ckpt = model_from_checkpoint(args.ckpt, device, use_ema=not args.no_ema)
    if args.steps > diffusion.num_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the {diffusion.num_timesteps} timesteps the model was trained with")
    generator = torch.Generator().manual_seed(args.seed)
    labels = choose_labels(args, class_names, generator)
    c = model.config
    noise = torch.randn((len(labels), c.in_channels, c.image_size, c.image_size), generator=generator)

    images = []
    with torch.no_grad():
        for start in range(0, len(labels), args.batch_size):
            y = torch.tensor(labels[start:start + args.batch_size])
            images.append(diffusion.sample(
                model, (len(y), *noise.shape[1:]), y, sampler=args.sampler, steps=args.steps,
                cfg_scale=args.cfg_scale, null_class=c.null_class, eta=args.eta, thresholding=args.thresholding,
                noise=noise[start:start + len(y)], generator=generator, device=device).cpu())
    save_grid(torch.cat(images), args.out, nrow=args.nrow)

    # The prompt table: one line of label names per grid row.
    names = [class_names[i] for i in labels]
    table = "\n".join(" ".join(names[r:r + args.nrow]) for r in range(0, len(names), args.nrow)) + "\n"
    txt_path = os.path.splitext(args.out)[0] + ".txt"
    atomic_write(txt_path, lambda f: f.write(table), binary=False)
    print(f"{len(labels)} samples from {args.ckpt} (step {ckpt.get('step', '?')}, {'raw' if args.no_ema else 'EMA'} "
          f"weights), {args.sampler} {args.steps} steps, cfg {args.cfg_scale}, seed {args.seed} -> {args.out}, {txt_path}")


if __name__ == "__main__":
    run_cli(main)
