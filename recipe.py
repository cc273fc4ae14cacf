"""
The recipe: every choice the scripts offer, every default and why, and the command lines that set them.
The measurements behind the defaults are in docs/results.md.

PyTorch-free on purpose: the scripts parse their flags with this module before they import torch,
which takes seconds, so `--help` and a mistyped flag answer at once.

    TrainSettings     train.py's knobs, one line of why each (nanoGPT's config block)
    for_device        the GPU/CPU defaults, resolved by one pure function (check_for_device: what cannot run)
    *_parser          the flags of train.py, sample.py, infer_trt.py and export.py
"""
import argparse
import dataclasses
import os
from typing import Optional

from cli import (ArgumentParser, UserError, fraction, minutes_list, nonnegative_float, nonnegative_int,
                 positive_float, positive_int)

# ----------------------------------------------------------------------------------------------
#                                          The choices
# ----------------------------------------------------------------------------------------------
# diffusion.py, data.py and the scripts read these; each list exists only here.

PREDICTIONS = ("eps", "x0", "v")                      # what the network outputs
SCHEDULES = ("linear", "cosine")                      # noise schedules: DDPM, IDDPM
TIMESTEP_DRAWS = ("uniform", "logit-normal")          # how training draws t
LOSS_WEIGHTS = ("none", "min-snr", "v-clipped")       # weighting of the loss over t
SAMPLERS = ("ddpm", "ddim", "dpm++2m")                # the sampling loops of diffusion.py
DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder")
AMP_MODES = ("auto", "off", "fp16", "bf16")
COMPILE_MODES = ("auto", "on", "off")
PRECISIONS = ("fp32", "bf16", "fp16")                 # the network's weights when sampling in PyTorch
BACKENDS = ("trt", "ort", "torch")                    # infer_trt.py's runtimes, fastest first
OPSETS = (20, 21, 22, 23)

# ----------------------------------------------------------------------------------------------
#                                          Training
# ----------------------------------------------------------------------------------------------

GPU_MODEL = "DiT-S/4"        # paper Table 4: patch 4 beats patch 8 at equal parameters
CPU_MODEL = "DiT-T/4"        # 1.9M parameters: learns MNIST on a laptop CPU in half an hour
GPU_STEPS, CPU_MINUTES = 30_000, 30   # the default budgets: the lesson's T4 run; half an hour on a CPU
GPU_BATCH, CPU_BATCH = 128, 32        # on a CPU, images/s fall far less than the batch:
                                      # a small one gives more steps
LESSON_RECIPE = dict(model="DiT-S/8", prediction="eps", batch_size=128, lr=2e-4, warmup=0, label_dropout=0.2)
COMPILE_MIN_STEPS, COMPILE_MIN_MINUTES = 1000, 5   # a CPU compile pays back its start-up only in long runs
# The progress grids: fixed noise, DDIM 25 steps, so grids compare across steps; a row per class, at most 16.
GRID_SEED, GRID_STEPS, GRID_ROWS = 0, 25, 16


@dataclasses.dataclass
class TrainSettings:
    """Every knob of train.py, in the order of its flags (None: decided by for_device)."""
    # the model: a dit.py preset, optionally resized
    model: Optional[str] = None         # GPU_MODEL or CPU_MODEL: the largest that learns in each budget
    hidden_size: Optional[int] = None   # the size flags resize the preset, for quick experiments
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    # the data
    dataset: str = "mnist"              # the lesson's dataset
    data_dir: Optional[str] = None      # None: the repository's own copy of MNIST, else data.py's cache
    image_size: int = 32                # MNIST padded 28 -> 32: divisible by patch 2, 4 and 8
    channels: Optional[int] = None      # None: the dataset's own; 3 runs the RGB path on MNIST
    # the optimisation
    batch_size: Optional[int] = None    # GPU_BATCH fills a T4; CPU_BATCH gives a CPU more steps per minute
    steps: Optional[int] = None         # GPU_STEPS on a GPU; a CPU is bounded by max_minutes instead
    lr: float = 1e-3                    # the best of the CPU recipes measured (docs/results.md)
    warmup: int = 200                   # AdamW's first updates are large: ramp the rate up
    grad_clip: float = 1.0              # guards the early steps against spikes
    # the diffusion: these six equal DiffusionConfig's defaults (a test keeps them so)
    prediction: str = "x0"              # x0 draws digits in CPU minutes, eps does not (docs/results.md)
    schedule: str = "linear"            # DDPM's: 1e-4 -> 0.02 over T = 1000, the lesson's
    num_timesteps: int = 1000
    timesteps: str = "uniform"          # DDPM's uniform draw of t
    loss_weight: str = "none"           # plain MSE on the prediction, DDPM's L_simple
    snr_gamma: float = 5.0              # Min-SNR's gamma (Hang et al. 2023), when a weighting is chosen
    # the model's conditioning and the weights that sample
    learn_sigma: bool = False           # fixed variances: L_simple alone; True adds IDDPM's hybrid loss
    label_dropout: float = 0.1          # trains the null class that classifier-free guidance needs
    ema_decay: float = 0.999            # a short run's average: the paper's 0.9999 would still hold the init
    lesson_recipe: bool = False         # LESSON_RECIPE in place of these defaults, to compare with the lesson
    # the run
    out: Optional[str] = None           # None: runs/<model>-<dataset>
    resume: Optional[str] = None        # a checkpoint, or "auto": OUT/ckpt.pt when it exists
    device: Optional[str] = None        # None: CUDA when there is a GPU
    seed: int = 0                       # one seed for the weights, the batches and the noise: runs repeat
    sample_every: int = 1000            # a grid now and then shows the run is learning
    sample_cfg: float = 1.0             # unguided grids show the model as it is
    ckpt_every: int = 1000              # a crash costs at most this many steps
    snapshot_minutes: Optional[tuple] = None   # timed copies of the checkpoint: a quality-versus-time curve
    log_every: int = 50                 # often enough for a curve, rarely enough to cost nothing
    amp: str = "auto"                   # bf16 where the GPU has it, fp16 + GradScaler on a T4, fp32 on a CPU
    compile: str = "auto"               # torch.compile where it pays back its compile time
    threads: Optional[int] = None       # None: torch's choice, one per core
    max_minutes: Optional[float] = None  # a wall-clock budget; CPU_MINUTES on a CPU without --steps
    ddp_timeout: float = 300            # long enough for a checkpoint or a grid on rank 0


def train_parser():
    d = TrainSettings()
    p = ArgumentParser(description="Train a class-conditional DiT (see the module docstring).")
    a = p.add_argument
    a("--model", default=d.model, help=f"a preset of dit.py: DiT-{{S,B,L,XL}}/{{2,4,8}} or DiT-T/4 (None: "
      f"{GPU_MODEL} on a GPU, {CPU_MODEL} on a CPU)")
    a("--hidden-size", type=positive_int, default=d.hidden_size, help="override the preset's width D")
    a("--depth", type=positive_int, default=d.depth, help="override the preset's number of DiT blocks")
    a("--num-heads", type=positive_int, default=d.num_heads, help="override the preset's attention heads")
    a("--patch-size", type=positive_int, default=d.patch_size, help="override the preset's patch size p")
    a("--dataset", default=d.dataset, choices=DATASETS, help="what to train on (data.py)")
    a("--data-dir", default=d.data_dir, help="folder with the dataset files (None: the repository's mnist/ "
      "for MNIST, else data.py's cache, downloading)")
    a("--image-size", type=positive_int, default=d.image_size,
      help="images are padded or resized to this size")
    a("--channels", type=int, default=d.channels, choices=(1, 3), help="None: the dataset's own")
    a("--batch-size", type=positive_int, default=d.batch_size, help=f"GLOBAL batch, split evenly over DDP "
      f"ranks (None: {GPU_BATCH} on a GPU, {CPU_BATCH} on a CPU)")
    a("--steps", type=positive_int, default=d.steps, help=f"total optimizer steps, a resumed run counts on "
      f"(None: {GPU_STEPS:,} on a GPU; on a CPU as many as fit in --max-minutes {CPU_MINUTES})")
    a("--lr", type=positive_float, default=d.lr, help="AdamW learning rate after the warm-up")
    a("--warmup", type=nonnegative_int, default=d.warmup,
      help="linear learning-rate warm-up steps (0 = none)")
    a("--grad-clip", type=nonnegative_float, default=d.grad_clip, help="max gradient norm (0 = no clipping)")
    a("--prediction", default=d.prediction, choices=PREDICTIONS, help="what the network predicts (x0: see "
      "docstring)")
    a("--schedule", default=d.schedule, choices=SCHEDULES, help="noise schedule (DDPM / IDDPM)")
    a("--num-timesteps", type=positive_int, default=d.num_timesteps,
      help="T, the diffusion's number of steps")
    a("--timesteps", default=d.timesteps, choices=TIMESTEP_DRAWS, help="how training draws t (diffusion.py)")
    a("--loss-weight", default=d.loss_weight, choices=LOSS_WEIGHTS, help="weighting of the loss over t "
      "(diffusion.py)")
    a("--snr-gamma", type=positive_float, default=d.snr_gamma, help="the clip of --loss-weight min-snr and "
      "v-clipped")
    a("--learn-sigma", action="store_true", help="also learn the variance (IDDPM hybrid loss)")
    a("--label-dropout", type=fraction, default=d.label_dropout, help="share of labels replaced by the null "
      "class (for CFG)")
    a("--ema-decay", type=fraction, default=d.ema_decay, help="decay of the weights' moving average used for "
      "sampling")
    a("--lesson-recipe", action="store_true", help="the xdiffusion lesson's setup: " +
      " ".join(f"--{k.replace('_', '-')} {v}" for k, v in LESSON_RECIPE.items()))
    a("--out", default=d.out, help="run folder (None: runs/<model>-<dataset>)")
    a("--resume", default=d.resume, help="checkpoint to continue, or 'auto' = OUT/ckpt.pt if it exists")
    a("--device", default=d.device, help="cpu, cuda, cuda:N (None: cuda if available)")
    a("--seed", type=int, default=d.seed, help="seed of the weights, batches, noise and label dropout")
    a("--sample-every", type=nonnegative_int, default=d.sample_every, help="steps between sample grids, "
      "a row of 8 per class (0 = only at the end)")
    a("--sample-cfg", type=nonnegative_float, default=d.sample_cfg, help="classifier-free guidance scale of "
      "those grids")
    a("--ckpt-every", type=nonnegative_int, default=d.ckpt_every, help="steps between checkpoints "
      "(0 = only at the end)")
    a("--snapshot-minutes", type=minutes_list, default=d.snapshot_minutes, help="also keep the checkpoint as "
      "OUT/ckpt_<M>min.pt when the run's wall time passes each of these minutes, e.g. 10,30,60 (a "
      "quality-versus-time curve)")
    a("--log-every", type=positive_int, default=d.log_every,
      help="steps between log.csv rows and progress lines")
    a("--amp", default=d.amp, choices=AMP_MODES,
      help="auto: bf16 on GPUs that have it, fp16 + GradScaler on others (T4), off on CPU")
    a("--compile", nargs="?", const="on", default=d.compile, choices=COMPILE_MODES,
      help="torch.compile the model for training: faster steps, same math (auto: on a CPU for runs of "
      f"{COMPILE_MIN_STEPS:,}+ steps and {COMPILE_MIN_MINUTES}+ minutes, where the compile time pays back)")
    a("--threads", type=positive_int, default=d.threads, help="CPU threads (None: torch's, one per core)")
    a("--max-minutes", type=positive_float, default=d.max_minutes, help="stop cleanly after this wall time, "
      f"with a checkpoint (None: no limit, but {CPU_MINUTES} on a CPU when --steps is not given either)")
    a("--ddp-timeout", type=positive_float, default=d.ddp_timeout, help="seconds a DDP process waits for the "
      "others before it gives up (a stopped or hung process ends the run, resumable from its last "
      "checkpoint)")
    return p


def typed_flags(argv):
    """The settings typed on the command line: the flags parsed again with every default hidden."""
    quiet = train_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def parse_train_args(argv):
    """train.py's flags -> TrainSettings; --lesson-recipe replaces the defaults, explicit flags still win."""
    settings = TrainSettings(**vars(train_parser().parse_args(argv)))
    if settings.lesson_recipe:
        typed = typed_flags(argv)
        settings = dataclasses.replace(settings, **{k: v for k, v in LESSON_RECIPE.items() if k not in typed})
    return settings


def for_device(s, cuda, have_compiler):
    """The defaults that depend on the device -> (settings, notes to print). A CPU gets the small model at
    batch 32 for half an hour, not the GPU's 30k steps (most of a day on a CPU); torch.compile where it pays
    back. have_compiler: a C++ compiler for torch.compile's CPU backend was found."""
    notes, chosen = [], []
    if not cuda and s.model is None:
        chosen.append(f"the CPU model {CPU_MODEL}")
    if not cuda and s.batch_size is None:
        chosen.append(f"at batch {CPU_BATCH}")
    max_minutes = s.max_minutes
    if not cuda and s.steps is None and s.max_minutes is None:
        max_minutes = CPU_MINUTES
        chosen.append(f"for {CPU_MINUTES} minutes")
    if chosen:
        notes.append(f"no CUDA GPU: training {' '.join(chosen)} (the CPU defaults; --model, --batch-size, "
                     f"--steps and --max-minutes choose)")
    steps = s.steps or GPU_STEPS
    compile = s.compile
    if compile == "auto":
        short = steps < COMPILE_MIN_STEPS or (max_minutes or float("inf")) < COMPILE_MIN_MINUTES
        compile = "off" if cuda or short else "on"
        if compile == "on" and not have_compiler:
            compile = "off"
            notes.append("no C++ compiler found for torch.compile (install g++ or set $CXX): training "
                         "without --compile")
    model = s.model or (GPU_MODEL if cuda else CPU_MODEL)
    batch_size = s.batch_size or (GPU_BATCH if cuda else CPU_BATCH)
    resolved = dataclasses.replace(s, model=model, batch_size=batch_size, steps=steps,
                                   max_minutes=max_minutes, compile=compile)
    return resolved, notes


def check_for_device(s, cuda, world, have_compiler):
    """Refuse resolved settings this machine cannot run, each with a one-line error."""
    if s.compile == "on" and not cuda and not have_compiler:
        raise UserError("--compile needs a C++ compiler on a CPU (install g++ or set $CXX), or pass "
                        "--compile off")
    if s.batch_size % world:
        raise UserError(f"--batch-size {s.batch_size} is not divisible by the {world} DDP processes")


# ----------------------------------------------------------------------------------------------
#                       Sampling: sample.py and infer_trt.py share these flags
# ----------------------------------------------------------------------------------------------
# Both scripts draw images the same way (sample.draw_samples), so a seed gives the same digits from
# either and on any backend. The defaults come from the quality-versus-cost table in docs/results.md.

DEFAULT_SAMPLER = "dpm++2m"     # 5 steps, 10 network evaluations per digit: as good as DDIM-25/50
DEFAULT_STEPS = 5               # at a fraction of the cost; stronger guidance raises accuracy but
DEFAULT_CFG = 1.2               # worsens FD, weaker the reverse
DEFAULT_NUM_SAMPLES = 64
DEFAULT_BATCH_SIZE = 64         # images per network batch; export.py tunes the engine for twice it (guidance)


def add_sampling_args(parser, default_out):
    """The sampling flags shared by sample.py and infer_trt.py."""
    a = parser.add_argument
    a("--labels", default=None, help='labels to draw, e.g. "2 4 one nine" (one image each)')
    a("--num-samples", type=positive_int, default=None,
      help=f"without --labels: how many images (None: {DEFAULT_NUM_SAMPLES})")
    a("--label-order", default="cycle", choices=("cycle", "random"), help="labels for --num-samples: "
      "0,1,2,... or random")
    a("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help="the sampling loop of diffusion.py")
    a("--steps", type=positive_int, default=DEFAULT_STEPS,
      help="sampling steps (evenly spaced over the trained T)")
    a("--cfg-scale", type=nonnegative_float, default=DEFAULT_CFG,
      help="classifier-free guidance scale (1 = none; other values double the network batch)")
    a("--eta", type=nonnegative_float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    a("--thresholding", action="store_true", help="dynamic thresholding of x0 (Imagen; the lesson's sampler "
      "used it)")
    a("--seed", type=int, default=0, help="seed of the starting noise (and of random labels)")
    a("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="images per network batch (CFG "
      "doubles it)")
    a("--nrow", type=positive_int, default=8, help="images per grid row")
    a("--out", default=default_out, help="PNG grid to write; the label names go beside it as .txt")
    a("--device", default=None, help="cpu, cuda, cuda:N for PyTorch (None: cuda if available)")
    a("--threads", type=positive_int, default=None, help="torch CPU threads (None: torch's, one per core)")


SAMPLING_VALUES = ("labels", "num_samples", "label_order", "seed", "sampler", "steps", "cfg_scale", "eta",
                   "thresholding", "batch_size")      # what sample.draw_labelled takes


def sampling_values(args):
    """The parsed sampling flags that choose the images, as sample.draw_labelled's keyword arguments."""
    return {k: getattr(args, k) for k in SAMPLING_VALUES}


def check_sampling_args(args):
    if args.labels is not None and args.num_samples is not None:
        raise UserError("give either --labels or --num-samples, not both")
    return args


def sample_parser():
    p = ArgumentParser(description="Sample a grid of digits (or any classes) from a DiT checkpoint.")
    p.add_argument("--ckpt", default=None, help="checkpoint written by train.py, RUN/ckpt.pt "
                   "(None: the shipped model, checkpoints/dit-t4-mnist.pt)")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained weights instead of their EMA")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="weights' dtype for the network (bf16 is faster on CPUs with AMX/AVX512-BF16)")
    add_sampling_args(p, default_out="runs/samples.png")
    return p


def parse_sample_args(argv):
    return check_sampling_args(sample_parser().parse_args(argv))


ENGINE_NAME, ONNX_NAME = "model_fp16.engine", "model.onnx"


def infer_parser():
    p = ArgumentParser(description="Sample a labelled PNG grid on a TensorRT engine / ONNX Runtime / "
                                   "PyTorch.")
    a = p.add_argument
    a("--engine", default=None, help=f"TensorRT engine from export.py ({ENGINE_NAME})")
    a("--onnx", default=None, help=f"ONNX file from export.py (None: {ONNX_NAME} beside the engine)")
    a("--ckpt", default=None, help="the checkpoint: for --backend torch and --compare; checked against the "
      "sidecar")
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="auto = the fastest available")
    a("--cuda-graph", action="store_true", help="trt: replay each batch size as one CUDA graph")
    a("--compare", action="store_true", help="also run PyTorch from the same noise; print pixel difference "
      "and ms/step")
    add_sampling_args(p, default_out="runs/samples_infer.png")    # the flags and defaults of sample.py
    return p


def parse_infer_args(argv):
    return check_sampling_args(infer_parser().parse_args(argv))


# ----------------------------------------------------------------------------------------------
#                                            Export
# ----------------------------------------------------------------------------------------------

# The trained model the repository ships (train.py's CPU default, EMA weights; its record is in the file and
# in docs/results.md): what the sampling, export and measuring scripts use when --ckpt is not given.
SHIPPED_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "dit-t4-mnist.pt")
SHIPPED_EXPORT_DIR = "runs/shipped"   # export.py's folder for the shipped model, outside the tracked files
EXPERIMENTAL_OPSET = 23  # emits ONNX Attention nodes,
                         # which TensorRT's ONNX importer has handled only recently


def export_parser():
    p = ArgumentParser(description="Export a DiT checkpoint to ONNX and a TensorRT fp16 engine.")
    a = p.add_argument
    a("--ckpt", default=None, help="checkpoint written by train.py (None: the shipped model, "
      "checkpoints/dit-t4-mnist.pt)")
    a("--out-dir", default=None, help="folder for the files (None: the checkpoint's folder; "
      f"{SHIPPED_EXPORT_DIR} for the shipped model)")
    a("--weights", choices=("ema", "model"), default="ema", help="the EMA or the raw trained weights")
    a("--opset", type=int, default=20, choices=OPSETS, help=f"ONNX opset; {EXPERIMENTAL_OPSET} is "
      "experimental (ONNX Attention nodes, new in TensorRT's importer)")
    a("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="the sampling batch the engine is "
      "tuned for (sample.py's and infer_trt.py's default); the profile's opt is 2x: guidance doubles it")
    a("--max-batch", type=positive_int, default=256, help="largest engine batch (at least 2x --batch-size)")
    a("--opt-level", type=int, default=3, choices=range(6), help="TensorRT builder optimisation level")
    a("--workspace-gb", type=positive_int, default=4, help="TensorRT builder workspace limit")
    a("--verify-steps", type=positive_int, default=10, help="DDIM steps of the fixed-seed comparison")
    a("--seed", type=nonnegative_int, default=0, help="seed of the check inputs")
    a("--device", default=None, help="where PyTorch runs the checks: cpu, cuda, cuda:N (None: cuda if "
      "available)")
    return p


def parse_export_args(argv):
    args = export_parser().parse_args(argv)
    if 2 * args.batch_size > args.max_batch:
        raise UserError(f"--max-batch {args.max_batch} must be at least 2 x --batch-size = "
                        f"{2 * args.batch_size} (classifier-free guidance runs a doubled batch)")
    return args
