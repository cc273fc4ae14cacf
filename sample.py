"""
Draw class-conditional samples from a checkpoint written by train.py into a PNG grid.

    python sample.py --labels "2 4 one nine 2 eight 7 9" --out runs/grid.png   # the shipped model
    python sample.py --ckpt runs/dit-t-4-mnist/ckpt.pt --labels "2 4 one nine 2 eight 7 9" --out grid.png
    python sample.py --ckpt RUN/ckpt.pt --num-samples 64 --label-order cycle --sampler ddim --steps 25

Labels are class numbers, class names or (for digit datasets) English words ("7", "seven").
Beside grid.png goes grid.txt: the label names, one line per grid row (the lesson's prompt table).
Sampling uses the EMA weights unless --no-ema. Noise for all images is drawn up front from one
CPU generator seeded with --seed, so a seed gives the same images whatever --batch-size or device
(exactly so for the deterministic samplers: ddim with eta 0, dpm++2m).
"""
import sys

from cli import (ArgumentParser, add_sampling_args, check_sampling_args, checkpoint_or_shipped, label_table_path,
                 pick_device, refuse_overwrite, run_cli)


def parse_args(argv):
    p = ArgumentParser(description="Sample a grid of digits (or any classes) from a DiT checkpoint.")
    p.add_argument("--ckpt", default=None, help="checkpoint written by train.py, RUN/ckpt.pt (None: the shipped "
                   "model, checkpoints/dit-t4-mnist.pt)")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained weights instead of their EMA")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights' dtype for the network (bf16 is faster on CPUs with AMX/AVX512-BF16)")
    add_sampling_args(p, default_out="runs/samples.png")
    args = p.parse_args(argv)
    check_sampling_args(args)
    return args


if __name__ == "__main__":
    run_cli(lambda: parse_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads (seconds)

import torch  # noqa: E402  (imported after the flags on purpose)

from data import save_grid, write_label_table  # noqa: E402
from runtime import TorchBackend, choose_labels, draw_samples, model_from_checkpoint  # noqa: E402


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.ckpt = checkpoint_or_shipped(args.ckpt)
    refuse_overwrite({"--out": args.out, "--out's label table": label_table_path(args.out)},
                     {"--ckpt": args.ckpt})
    model, diffusion, class_names, ckpt = model_from_checkpoint(args.ckpt, device, use_ema=not args.no_ema)
    generator = torch.Generator().manual_seed(args.seed)
    labels = choose_labels(args, class_names, generator)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    images = draw_samples(TorchBackend(model, dtype), diffusion, model.config, labels, generator,
                          sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, eta=args.eta,
                          thresholding=args.thresholding, batch_size=args.batch_size, device=device)
    save_grid(images, args.out, nrow=args.nrow)
    txt_path = write_label_table(labels, class_names, args.out, args.nrow)
    print(f"{len(labels)} samples from {args.ckpt} (step {ckpt.get('step', '?')}, {'raw' if args.no_ema else 'EMA'} "
          f"weights), {args.sampler} {args.steps} steps, cfg {args.cfg_scale}, seed {args.seed} -> {args.out}, {txt_path}")


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-size or --num-samples")
