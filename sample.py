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

Read top to bottom: the flags -> the model call in PyTorch -> a model from a checkpoint -> labels -> the
batch loop around diffusion.sample -> PNG grids -> main. train.py's progress grids, export.py's checks,
infer_trt.py and the tools sample through the same loop. The sampling flags and their defaults are shared
with infer_trt.py (support.add_sampling_args).
"""
import contextlib
import copy
import math
import os
import re
import sys

from support import (ArgumentParser, UserError, add_sampling_args, check_sampling_args, checkpoint_or_shipped,
                     run_cli)


def sample_parser():
    p = ArgumentParser(description="Sample a grid of digits (or any classes) from a DiT checkpoint.")
    p.add_argument("--ckpt", default=None, help="checkpoint written by train.py, RUN/ckpt.pt "
                   "(None: the shipped model, checkpoints/dit-t4-mnist.pt)")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained weights instead of their EMA")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights' dtype for the network (bf16 is faster on CPUs with AMX/AVX512-BF16)")
    add_sampling_args(p, default_out="runs/samples.png")
    return p


def parse_args(argv):
    return check_sampling_args(sample_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: parse_args(sys.argv[1:]))   # --help answers before torch loads

# ruff: noqa: E402
# PyTorch and the modules that use it load only here, after the flags.
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from data import label_spelling, to_uint8
from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, DiTConfig
from support import (DEFAULT_NUM_SAMPLES, Progress, atomic_write, check_writable, first_line, image_format,
                     is_char_device, load_checkpoint, pick_device, refuse_overwrite, sampling_values)

# ----------------------------------------------------------------------------------------------
#                                   The model call in PyTorch
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tf32(enabled):
    """TF32 on or off for CUDA matmuls and cuDNN convolutions inside the block, as before it afterwards.
    TF32 rounds fp32 inputs to 10 mantissa bits: free speed in training, but a comparison's fp32 reference
    must be IEEE fp32 (cuDNN allows TF32 by default, so it is turned off explicitly)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class LowPrecision(nn.Module):
    """A bf16/fp16 copy of the model behind float32 inputs and output, so the sampler's math stays fp32.

    Casting the weights once beats autocast, which re-casts every weight on every call. dit.py keeps the
    numerically fragile parts (timestep sin/cos, LayerNorm statistics) in fp32 whatever the weights' dtype,
    so the fp16 ONNX graph exported from this module keeps them in fp32 too.
    """

    def __init__(self, model, dtype):
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype).eval()
        self.config = model.config

    def forward(self, x, t, y):
        return self.model(x.to(next(self.model.parameters()).dtype), t, y).float()


class TorchBackend:
    """The PyTorch model as diffusion.py's model_fn(x, t, y) -> out, eager: the reference every other backend
    (ONNX Runtime, TensorRT) is compared against, so its fp32 is IEEE fp32, whatever the process set for TF32.
    dtype bf16/fp16: a low-precision copy of the weights (LowPrecision). meta: the checkpoint it came from."""

    def __init__(self, model, dtype=None, meta=None):
        self.net = model.eval() if dtype in (None, torch.float32) else LowPrecision(model, dtype)
        self.device = next(model.parameters()).device
        self.meta = meta

    @torch.no_grad()
    def __call__(self, x, t, y):
        d = self.device
        with tf32(False):
            return self.net(x.to(d, torch.float32), t.to(d), y.to(d)).float()


# ----------------------------------------------------------------------------------------------
#                                   A model from a checkpoint
# ----------------------------------------------------------------------------------------------

def configs_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild (DiTConfig, DiffusionConfig) from the dicts stored in a checkpoint (or an export sidecar)."""
    # A learn_sigma key in the diffusion config is ignored: the model config decides it, and the diffusion
    # reads it off the network's output channels.
    try:
        diffusion = {k: v for k, v in ckpt["diffusion_config"].items() if k != "learn_sigma"}
        return DiTConfig(**ckpt["model_config"]), DiffusionConfig(**diffusion)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} has a model config this code does not understand ({e}); "
                        f"it was written by another version") from None


def class_names_of(meta, model_config):
    """A checkpoint's or sidecar's class names; "0", "1", ... for a file without them."""
    return meta.get("class_names") or [str(i) for i in range(model_config.num_classes)]


def model_from_checkpoint(path, device="cpu", use_ema=True):
    """Checkpoint file -> (DiT in eval mode on device, GaussianDiffusion, class_names, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model_config, diffusion_config = configs_from_checkpoint(ckpt, path)
    model = DiT(model_config)
    if not use_ema and ckpt.get("sampling_only"):
        raise UserError(f"{path} is a sampling-only checkpoint: it holds the EMA weights only; drop --no-ema "
                        f"(or --weights model)")
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match its model config ({first_line(e)}); "
                        f"the file is corrupt") from None
    return (model.to(device).eval(), GaussianDiffusion(diffusion_config),
            class_names_of(ckpt, model_config), ckpt)


# ----------------------------------------------------------------------------------------------
#                                   Labels: text <-> classes
# ----------------------------------------------------------------------------------------------

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def parse_labels(text, class_names):
    """'2 4 one nine' -> [2, 4, 1, 9]. Accepts class names (case-insensitive, spaces typed as _), class
    indices and, for digit datasets (classes named "0", "1", ...), English number words; separators are
    spaces and commas. A name wins over an index: image-folder classes named "1", "3", "7" are asked for
    by name."""
    lookup = {label_spelling(name): i for i, name in enumerate(class_names)}
    if class_names == [str(i) for i in range(len(class_names))] and len(class_names) <= len(DIGIT_WORDS):
        lookup.update({w: i for i, w in enumerate(DIGIT_WORDS[:len(class_names)])})
    labels = []
    for token in text.replace(",", " ").split():
        word = token.lower()
        if word in lookup:
            i = lookup[word]
        elif re.fullmatch(r"[+-]?\d+", word):
            i = int(word)
            if not 0 <= i < len(class_names):
                raise UserError(f"label {token} is out of range: "
                                f"this model has classes 0-{len(class_names) - 1}")
        else:
            raise UserError(f"unknown label {token!r}: use a class number 0-{len(class_names) - 1} or a name "
                            f"such as {', '.join(repr(n) for n in list(lookup)[:3])}")
        labels.append(i)
    if not labels:
        raise UserError("no labels given; pass e.g. --labels '7 seven 3'")
    return labels


def choose_labels(labels_text, num_samples, label_order, class_names, generator):
    """--labels text, or --num-samples labels in cycle (0, 1, 2, ...) or random order -> class indices."""
    if labels_text is not None:
        return parse_labels(labels_text, class_names)
    n, k = num_samples or DEFAULT_NUM_SAMPLES, len(class_names)
    if label_order == "cycle":
        return [i % k for i in range(n)]
    return torch.randint(k, (n,), generator=generator).tolist()


def label_table_path(png_path):
    """grid.png -> grid.txt: where the label names of a sampled grid go (a device such as /dev/null takes
    both)."""
    return png_path if is_char_device(png_path) else os.path.splitext(os.fspath(png_path))[0] + ".txt"


def write_label_table(labels, class_names, png_path, nrow):
    """The label names beside the grid (grid.png -> grid.txt), one line per grid row, like the lesson's
    prompt table. Returns the .txt path."""
    names = [class_names[i] for i in labels]
    table = "\n".join(" ".join(names[r:r + nrow]) for r in range(0, len(names), nrow)) + "\n"
    txt_path = label_table_path(png_path)
    atomic_write(txt_path, lambda f: f.write(table), binary=False)
    return txt_path


# ----------------------------------------------------------------------------------------------
#                                       The batch loop
# ----------------------------------------------------------------------------------------------

def draw_samples(model_fn, diffusion, model_config, labels, generator, *, sampler, steps, cfg_scale,
                 eta=0.0, thresholding=False, batch_size=64, device="cpu", done=None,
                 lower_order_final=False):
    """Images (N, C, H, W) in [-1, 1] on the CPU for `labels`, in batches; the starting noise of all N
    is drawn first from `generator`, so the images do not depend on batch_size or device. Each finished
    batch is also appended to the list `done`, when given, so a stopped caller keeps what was drawn."""
    if not 1 <= steps <= diffusion.num_timesteps:
        raise UserError(f"--steps {steps} is outside 1-{diffusion.num_timesteps}, the timesteps the model "
                        f"was trained with")
    shape = model_config.image_shape                                    # (C, H, W)
    noise = torch.randn((len(labels), *shape), generator=generator)    # (N, C, H, W)
    batches = math.ceil(len(labels) / batch_size)
    # Long work shows its progress: one network call per sampling step, counted over all batches.
    progress = Progress(batches * steps, "sampling step ") if batches > 1 or steps >= 100 else None
    calls = 0

    def counted(x, t, y):
        nonlocal calls
        out = model_fn(x, t, y)
        calls += 1
        progress.update(calls)
        return out
    images = [] if done is None else done
    for i in range(0, len(labels), batch_size):
        y = torch.tensor(labels[i:i + batch_size])
        with torch.no_grad():
            images.append(diffusion.sample(
                counted if progress else model_fn, (len(y), *shape), y, sampler=sampler, steps=steps,
                cfg_scale=cfg_scale, null_class=model_config.null_class, eta=eta, thresholding=thresholding,
                noise=noise[i:i + len(y)], generator=generator, device=device,
                lower_order_final=lower_order_final).cpu())
    if progress:
        progress.update(calls, force=True)
        progress.close()
    return torch.cat(images)


def draw_labelled(model_fn, diffusion, model_config, class_names, device, *, labels, num_samples, label_order,
                  seed, sampler, steps, cfg_scale, eta, thresholding, batch_size, lower_order_final):
    """What the sampling flags ask for (support.sampling_values): the labels, then their images from one
    generator seeded with `seed` -> (images, labels)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = choose_labels(labels, num_samples, label_order, class_names, generator)
    images = draw_samples(model_fn, diffusion, model_config, chosen, generator, sampler=sampler, steps=steps,
                          cfg_scale=cfg_scale, eta=eta, thresholding=thresholding, batch_size=batch_size,
                          device=device, lower_order_final=lower_order_final)
    return images, chosen


def save_labelled_grid(images, labels, class_names, out, nrow, cfg_scale):
    """The grid and its label table beside it -> the table's path. With cfg_scale 0 the samples are
    unconditional, and the table says so instead of naming labels that chose nothing."""
    save_grid(images, out, nrow=nrow)
    if cfg_scale == 0:
        print("note: --cfg-scale 0 samples unconditionally: the labels do not choose the digits, and "
              f"{label_table_path(out)} says 'unconditional'", file=sys.stderr)
        class_names = ["unconditional"] * len(class_names)
    return write_label_table(labels, class_names, out, nrow)


# ----------------------------------------------------------------------------------------------
#                                   Pictures: images -> PNG grids
# ----------------------------------------------------------------------------------------------

def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest difference of two image batches in [-1, 1], in grey levels of 255: as floats and as saved
    (uint8)."""
    return {"float": (a - b).abs().max().item() * 127.5,
            "uint8": int((to_uint8(a).int() - to_uint8(b).int()).abs().max())}


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
    """Write images as a grid atomically, in the format its name says (PNG unless .jpg, .webp, ...); an
    unwritable path is a one-line UserError."""
    grid = image_grid(images, nrow)
    atomic_write(path, lambda f: grid.save(f, format=image_format(path)))


# ----------------------------------------------------------------------------------------------
#                                            main
# ----------------------------------------------------------------------------------------------

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ckpt_path = checkpoint_or_shipped(args.ckpt)
    refuse_overwrite({"--out": args.out, "--out's label table": label_table_path(args.out)},
                     {"--ckpt": ckpt_path})
    image_format(args.out)
    model, diffusion, class_names, ckpt = model_from_checkpoint(ckpt_path, device, use_ema=not args.no_ema)
    model_fn = TorchBackend(model, PRECISION_DTYPES[args.precision])
    images, labels = draw_labelled(model_fn, diffusion, model.config, class_names, device,
                                   **sampling_values(args))
    txt_path = save_labelled_grid(images, labels, class_names, args.out, args.nrow, args.cfg_scale)
    weights = "raw" if args.no_ema else "EMA"
    print(f"{len(labels)} samples from {ckpt_path} (step {ckpt.get('step', '?')}, {weights} weights), "
          f"{args.sampler} {args.steps} steps, cfg {args.cfg_scale}, seed {args.seed} -> {args.out}, "
          f"{txt_path}")


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-size or --num-samples")
