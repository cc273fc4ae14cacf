"""
Helpers shared by the scripts (train, sample, export, infer_trt, evaluate, bench): the checkpoint
format, label parsing, image grids, and the one-line error every script prints for bad input.
"""
import dataclasses
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image

from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, DiTConfig


class UserError(Exception):
    """Bad input from the user (path, file, label, flag); str(e) is one line naming the problem and the fix."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `script: error: message` and exit status 2, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


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

CHECKPOINT_FORMAT = "dit-checkpoint"
CHECKPOINT_VERSION = 1


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


def save_checkpoint(path, state):
    """Save a checkpoint dict atomically, stamped with the format and version."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; every way it can be wrong is a one-line UserError."""
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


def configs_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild (DiTConfig, DiffusionConfig) from the dicts stored in a checkpoint."""
    try:
        return DiTConfig(**ckpt["model_config"]), DiffusionConfig(**ckpt["diffusion_config"])
    except TypeError as e:
        raise UserError(f"{path} has a model config this code does not understand ({e}); "
                        f"it was written by another version") from None


def model_from_checkpoint(path, device="cpu", use_ema=True):
    """Checkpoint file -> (DiT in eval mode on device, GaussianDiffusion, class_names, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model_config, diffusion_config = configs_from_checkpoint(ckpt, path)
    model = DiT(model_config)
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not match its model config ({first[:160]}); the file is corrupt") from None
    class_names = ckpt.get("class_names") or [str(i) for i in range(model_config.num_classes)]
    return model.to(device).eval(), GaussianDiffusion(diffusion_config), class_names, ckpt


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file: identifies the checkpoint an exported ONNX or engine was built from."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
#                                           Labels
# ----------------------------------------------------------------------------------------------

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
#                                         Image grids
# ----------------------------------------------------------------------------------------------

def to_uint8(images):
    """Float images in [-1, 1] (N, C, H, W) -> uint8 numpy (N, H, W, C)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images, nrow=8, padding=2):
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image, nrow images per row, black padding."""
    x = to_uint8(images)
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


def pick_device(name=None):
    """--device value -> torch.device; default: CUDA when available, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None


def config_dict(config):
    """A dataclass config as a plain dict (what checkpoints and sidecars store)."""
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------
#                         Sampling flags and the batch loop of the sampling CLIs
# ----------------------------------------------------------------------------------------------
# sample.py, infer_trt.py and evaluate.py draw images the same way, so a seed gives the same digits
# from any of them and on any backend: labels first, then all starting noise up front from one CPU
# generator, then diffusion.sample over batches. The defaults were chosen with evaluate.py's
# quality table (README, "Sample quality").

DEFAULT_SAMPLER = "dpm++2m"     # 5 steps at CFG 1.25: 97.5 % accuracy, FD/floor 1.99 with 10 network
DEFAULT_STEPS = 5               # evaluations per digit, as good as DDIM-25/50 (1.92-2.00) at 1/5-1/10 of the
DEFAULT_CFG = 1.25              # cost; stronger guidance raises accuracy but worsens FD (README table)
DEFAULT_NUM_SAMPLES = 64


def add_sampling_args(parser, default_out):
    """The sampling flags shared by sample.py and infer_trt.py."""
    from diffusion import SAMPLERS
    a = parser.add_argument
    a("--labels", default=None, help='labels to draw, e.g. "2 4 one nine" (one image each)')
    a("--num-samples", type=int, default=None, help=f"without --labels: how many images (default {DEFAULT_NUM_SAMPLES})")
    a("--label-order", default="cycle", choices=("cycle", "random"), help="labels for --num-samples: 0,1,2,... or random")
    a("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    a("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (evenly spaced over the trained T)")
    a("--cfg-scale", type=float, default=DEFAULT_CFG, help="classifier-free guidance scale (1 = none; >1 doubles the batch)")
    a("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    a("--thresholding", action="store_true", help="dynamic thresholding of x0 (Imagen; the seed's sampler used it)")
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, default=64, help="images per network batch (CFG doubles it)")
    a("--nrow", type=int, default=8, help="images per grid row")
    a("--out", default=default_out, help="PNG grid to write; the label names go beside it as .txt")


def check_sampling_args(args):
    """Reject impossible sampling flags with one line each, before any model is loaded."""
    for name in ("steps", "batch_size", "nrow"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.num_samples is not None and args.num_samples <= 0:
        raise UserError(f"--num-samples must be > 0, got {args.num_samples}")
    if args.labels is not None and args.num_samples is not None:
        raise UserError("give either --labels or --num-samples, not both")
    if args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    check_writable(args.out)


def choose_labels(args, class_names, generator):
    """--labels text, or --num-samples labels in cycle (0, 1, 2, ...) or random order -> class indices."""
    if args.labels is not None:
        return parse_labels(args.labels, class_names)
    n, k = args.num_samples or DEFAULT_NUM_SAMPLES, len(class_names)
    if args.label_order == "cycle":
        return [i % k for i in range(n)]
    return torch.randint(k, (n,), generator=generator).tolist()


def draw_samples(model_fn, diffusion, model_config, labels, generator, *, sampler, steps, cfg_scale,
                 eta=0.0, thresholding=False, batch_size=64, device="cpu"):
    """Images (N, C, H, W) in [-1, 1] on the CPU for `labels`, in batches; the starting noise of all N
    is drawn first from `generator`, so the images do not depend on batch_size or device."""
    shape = (model_config.in_channels, model_config.image_size, model_config.image_size)
    noise = torch.randn((len(labels), *shape), generator=generator)
    images = []
    for i in range(0, len(labels), batch_size):
        y = torch.tensor(labels[i:i + batch_size])
        with torch.no_grad():
            images.append(diffusion.sample(
                model_fn, (len(y), *shape), y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                null_class=model_config.null_class, eta=eta, thresholding=thresholding,
                noise=noise[i:i + len(y)], generator=generator, device=device).cpu())
    return torch.cat(images)


def write_label_table(labels, class_names, png_path, nrow):
    """The label names beside the grid (grid.png -> grid.txt), one line per grid row, like the seed's
    prompt table. Returns the .txt path."""
    names = [class_names[i] for i in labels]
    table = "\n".join(" ".join(names[r:r + nrow]) for r in range(0, len(names), nrow)) + "\n"
    txt_path = os.path.splitext(png_path)[0] + ".txt"
    atomic_write(txt_path, lambda f: f.write(table), binary=False)
    return txt_path
