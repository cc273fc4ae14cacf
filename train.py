"""
Train a class-conditional DiT on MNIST (or any dataset of data.py) in pixel space.

    python train.py                                  # the default model and recipe, batch 128
    python train.py --max-minutes 30                 # stop cleanly after 30 minutes (the CPU run)
    python train.py --resume auto                    # continue OUT/ckpt.pt exactly where it stopped
    python train.py --lesson-recipe                  # the xdiffusion lesson's setup (DiT-S/8, eps, Adam 2e-4)
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, --batch-size is global

Read top to bottom: flags -> DDP plumbing -> pieces of the loop -> set-up and resume -> train(), whose
loop is { draw batch, loss, step, EMA, log, sample grid, checkpoint } -> main. The defaults and why:
the README's recipe table (measurements: docs/results.md).

Randomness: each step draws the image indices, timesteps and noise of the whole GLOBAL batch from one
torch.Generator seeded with --seed (identical on every DDP rank), and rank r keeps rows r::world, so the
averaged DDP gradient is the single-process gradient. Only label dropout (inside the model) uses the
global RNG, seeded with seed + rank. Every RNG state is checkpointed: a resume is bit-exact on CPU.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time

from cli import (ArgumentParser, DiskFull, Progress, RunLock, RunLog, StopFlag, UserError, config_dict, disk_full,
                 fraction, has_fast_bf16, load_checkpoint, nonnegative_float, nonnegative_int, pick_device, positive_float,
                 positive_int, run_cli, save_checkpoint)

GPU_MODEL = "DiT-S/4"        # paper Table 4: patch 4 beats patch 8 at equal parameters
CPU_MODEL = "DiT-T/4"        # 1.9M parameters: learns MNIST on a laptop CPU in half an hour
GPU_STEPS, CPU_MINUTES = 30_000, 30   # the default budgets: the lesson's T4 run; half an hour on a CPU
GPU_BATCH, CPU_BATCH = 128, 32        # on a CPU, images/s fall far less than the batch: a small one gives more steps
LESSON_RECIPE = dict(model="DiT-S/8", prediction="eps", batch_size=128, lr=2e-4, warmup=0, label_dropout=0.2)
# The choices of diffusion.py and data.py, spelled out so that flags parse before torch loads (a test
# keeps them equal).
PREDICTIONS, TIMESTEP_DRAWS, LOSS_WEIGHTS = ("eps", "x0", "v"), ("uniform", "logit-normal"), ("none", "min-snr", "v-clipped")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder")
SIZE_FLAGS = ("hidden_size", "depth", "num_heads", "patch_size")   # override the preset's architecture
COMPILE_MIN_STEPS, COMPILE_MIN_MINUTES = 1000, 5   # CPU compile takes ~20 s and then saves ~15 % of each step
# The progress grids: fixed noise, DDIM 25 steps, so grids compare across steps; a row per class, at most 16.
GRID_SEED, GRID_STEPS, GRID_ROWS = 0, 25, 16


# ----------------------------------------------------------------------------------------------
#                                           Flags
# ----------------------------------------------------------------------------------------------

def build_parser():
    p = ArgumentParser(description="Train a class-conditional DiT (see the module docstring).")
    a = p.add_argument
    a("--model", default=None, help=f"a preset of dit.py: DiT-{{S,B,L,XL}}/{{2,4,8}} or DiT-T/4 (None: {GPU_MODEL} "
      f"on a GPU, {CPU_MODEL} on a CPU)")
    for name, what in zip(SIZE_FLAGS, ("width D", "number of DiT blocks", "attention heads", "patch size p")):
        a(f"--{name.replace('_', '-')}", type=positive_int, default=None, help=f"override the preset's {what}")
    a("--dataset", default="mnist", choices=DATASETS, help="what to train on (data.py)")
    a("--data-dir", default=None, help="folder with the dataset files (None: the repository's mnist/ for MNIST, "
      "else data.py's cache, downloading)")
    a("--image-size", type=positive_int, default=32, help="images are padded or resized to this size")
    a("--channels", type=int, default=None, choices=(1, 3), help="None: the dataset's own")
    a("--batch-size", type=positive_int, default=None, help=f"GLOBAL batch, split evenly over DDP ranks (None: "
      f"{GPU_BATCH} on a GPU, {CPU_BATCH} on a CPU)")
    a("--steps", type=positive_int, default=None, help=f"total optimizer steps, a resumed run counts on (None: "
      f"{GPU_STEPS:,} on a GPU; on a CPU as many as fit in --max-minutes {CPU_MINUTES})")
    a("--lr", type=positive_float, default=1e-3, help="AdamW learning rate after the warm-up")
    a("--warmup", type=nonnegative_int, default=200, help="linear learning-rate warm-up steps (0 = none)")
    a("--grad-clip", type=nonnegative_float, default=1.0, help="max gradient norm (0 = no clipping)")
    a("--prediction", default="x0", choices=PREDICTIONS, help="what the network predicts (x0: see docstring)")
    a("--schedule", default="linear", choices=("linear", "cosine"), help="noise schedule (DDPM / IDDPM)")
    a("--num-timesteps", type=positive_int, default=1000, help="T, the diffusion's number of steps")
    a("--timesteps", default="uniform", choices=TIMESTEP_DRAWS, help="how training draws t (diffusion.py)")
    a("--loss-weight", default="none", choices=LOSS_WEIGHTS, help="weighting of the loss over t (diffusion.py)")
    a("--snr-gamma", type=positive_float, default=5.0, help="the clip of --loss-weight min-snr and v-clipped")
    a("--learn-sigma", action="store_true", help="also learn the variance (IDDPM hybrid loss)")
    a("--label-dropout", type=fraction, default=0.1, help="share of labels replaced by the null class (for CFG)")
    a("--ema-decay", type=fraction, default=0.999, help="decay of the weights' moving average used for sampling")
    a("--lesson-recipe", action="store_true", help="the xdiffusion lesson's setup: " +
      " ".join(f"--{k.replace('_', '-')} {v}" for k, v in LESSON_RECIPE.items()))
    a("--out", default=None, help="run folder (None: runs/<model>-<dataset>)")
    a("--resume", default=None, help="checkpoint to continue, or 'auto' = OUT/ckpt.pt if it exists")
    a("--device", default=None, help="cpu, cuda, cuda:N (None: cuda if available)")
    a("--seed", type=int, default=0, help="seed of the weights, batches, noise and label dropout")
    a("--sample-every", type=nonnegative_int, default=1000, help="steps between sample grids, a row of 8 per class "
      "(0 = only at the end)")
    a("--sample-cfg", type=nonnegative_float, default=1.0, help="classifier-free guidance scale of those grids")
    a("--ckpt-every", type=nonnegative_int, default=1000, help="steps between checkpoints (0 = only at the end)")
    a("--snapshot-minutes", type=minutes_list, default=None, help="also keep the checkpoint as OUT/ckpt_<M>min.pt "
      "when the run's wall time passes each of these minutes, e.g. 10,30,60 (a quality-versus-time curve)")
    a("--log-every", type=positive_int, default=50, help="steps between log.csv rows and progress lines")
    a("--amp", default="auto", choices=("auto", "off", "fp16", "bf16"),
      help="auto: bf16 on GPUs that have it, fp16 + GradScaler on others (T4), off on CPU")
    a("--compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
      help="torch.compile the model for training: faster steps, same math (auto: on a CPU for runs of "
      f"{COMPILE_MIN_STEPS:,}+ steps and {COMPILE_MIN_MINUTES}+ minutes, where the compile time pays back)")
    a("--threads", type=positive_int, default=None, help="CPU threads (None: torch's, one per core)")
    a("--max-minutes", type=positive_float, default=None, help="stop cleanly after this wall time, with a checkpoint "
      f"(None: no limit, but {CPU_MINUTES} on a CPU when --steps is not given either)")
    a("--ddp-timeout", type=positive_float, default=300, help="seconds a DDP process waits for the others before "
      "it gives up (a stopped or hung process ends the run, resumable from its last checkpoint)")
    return p


def minutes_list(text):
    """'10,30,60' -> (10.0, 30.0, 60.0), increasing."""
    minutes = tuple(positive_float(m) for m in text.split(",") if m.strip())
    if list(minutes) != sorted(set(minutes)):
        raise argparse.ArgumentTypeError(f"{text!r}: give increasing minutes, e.g. 10,30,60")
    return minutes


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lesson_recipe:                 # the recipe replaces the defaults; explicit flags still win
        parser.set_defaults(**LESSON_RECIPE)
        args = parser.parse_args(argv)
    return args


if __name__ == "__main__":
    run_cli(lambda: parse_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads (seconds)

import torch  # noqa: E402  (imported after the flags on purpose)
import torch.distributed as dist  # noqa: E402

import data  # noqa: E402
from diffusion import DiffusionConfig, GaussianDiffusion  # noqa: E402
from dit import DiT, PRESETS, count_parameters  # noqa: E402


# ----------------------------------------------------------------------------------------------
#                    DistributedDataParallel plumbing (only under torchrun)
# ----------------------------------------------------------------------------------------------
# Deciding together (a signal, a NaN or the time limit must stop every rank at the same step, or DDP
# hangs), averaging the logged loss, and each rank's RNG state for an exact resume.

def setup_ddp(device_flag, timeout_s):
    """-> (rank, world, device); under torchrun (WORLD_SIZE > 1) joins the group: nccl on GPUs, gloo on CPU.
    A collective that waits longer than timeout_s for another process fails (TimeoutError below)."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), pick_device(device_flag)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, device


def over_ranks(values, op, world, device):
    """A list of floats combined over ranks: op "max" (true on any rank, for flags) or "mean" (the logged loss)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (t if op == "max" else t / world).tolist()


def rng_states(world, device):
    """Every rank's global RNG state (it draws the label dropout), in rank order, for the checkpoint."""
    state = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, {k: v.cpu() for k, v in state.items()})
    return states


# ----------------------------------------------------------------------------------------------
#                                  Pieces of the training loop
# ----------------------------------------------------------------------------------------------

def pick_amp(flag, device):
    """-> (autocast dtype or None, use GradScaler)."""
    if flag == "auto":
        flag = "off" if device.type != "cuda" else ("bf16" if has_fast_bf16(device) else "fp16")
    if flag == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on CPU")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[flag], flag == "fp16"


def learning_rate(args, step):
    """Linear warm-up over --warmup steps, then constant."""
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr


def optimizer_step(loss, model, optimizer, scaler, grad_clip):
    """Backward, clip, step -> whether a GradScaler (fp16) skipped the step for non-finite gradients."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)                   # clip the true gradients, not the scaled ones
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not scaler:
        optimizer.step()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale                # the scale drops exactly when a step was skipped


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """EMA of the weights with warm-up: early on (1+k)/(10+k) < decay, so the average forgets the random init."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


@torch.no_grad()
def sample_grid(ema, diffusion, config, device, path, cfg_scale):
    """A grid from the EMA weights, 8 images per row: row r is class r (the first GRID_ROWS classes)."""
    y = torch.tensor([r for r in range(min(config.num_classes, GRID_ROWS)) for _ in range(8)], device=device)
    images = diffusion.sample(ema, (len(y), config.in_channels, config.image_size, config.image_size), y,
                              sampler="ddim", steps=min(GRID_STEPS, diffusion.num_timesteps), cfg_scale=cfg_scale,
                              null_class=config.null_class, generator=torch.Generator().manual_seed(GRID_SEED),
                              device=device)
    data.save_grid(images, path, nrow=8)


# ----------------------------------------------------------------------------------------------
#                                     Set-up and resume
# ----------------------------------------------------------------------------------------------

def configure(args, world, device, say):
    """Threads, TF32, and the defaults that depend on the device: the model, the batch and the budget (a CPU
    gets the small model at batch 32 for half an hour, not the GPU's 30k steps, most of a day on a CPU)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":                     # TF32 matmuls: free speed where --amp is off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.model is not None and args.model not in PRESETS:
        raise UserError(f"unknown --model {args.model!r}; choose one of {', '.join(PRESETS)}")
    cpu, chosen = device.type != "cuda", []
    if cpu and args.model is None:
        chosen.append(f"the CPU model {CPU_MODEL}")
    if cpu and args.batch_size is None:
        chosen.append(f"at batch {CPU_BATCH}")
    if cpu and args.steps is None and args.max_minutes is None:
        args.max_minutes, chosen = CPU_MINUTES, chosen + [f"for {CPU_MINUTES} minutes"]
    if chosen:
        say(f"no CUDA GPU: training {' '.join(chosen)} (the CPU defaults; --model, --batch-size, --steps and "
            f"--max-minutes choose)")
    args.model = args.model or (GPU_MODEL if device.type == "cuda" else CPU_MODEL)
    args.batch_size = args.batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    args.steps = args.steps or GPU_STEPS
    if args.compile == "auto":
        short = args.steps < COMPILE_MIN_STEPS or (args.max_minutes or math.inf) < COMPILE_MIN_MINUTES
        args.compile = "off" if not cpu or short else "on"
        if args.compile == "on" and not cpp_compiler():
            args.compile = "off"
            say("no C++ compiler found for torch.compile (install g++ or set $CXX): training without --compile")
    elif args.compile == "on" and cpu and not cpp_compiler():
        raise UserError("--compile needs a C++ compiler on a CPU (install g++ or set $CXX), or pass --compile off")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} DDP processes")


def cpp_compiler():
    """The C++ compiler torch.compile's CPU backend (Inductor) calls, or None: $CXX, else g++ (clang++ on macOS)."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


def run_folder(args):
    """Create the run folder (default runs/<model>-<dataset>) -> (its path, whether this call created it)."""
    out = args.out or os.path.join("runs", re.sub(r"[^a-z0-9]+", "-", args.model.lower()) + "-" + args.dataset)
    data_dir = args.data_dir and os.path.realpath(args.data_dir)
    if data_dir and os.path.commonpath([data_dir, os.path.realpath(out)]) == data_dir:
        raise UserError(f"--out {out} is inside --data-dir {args.data_dir}: the run's files would become part of "
                        f"the data; pass an --out outside it")
    created = not os.path.exists(out)
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {out}: {e.strerror}; pass a writable --out") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"run folder {out} is not writable; pass a writable --out")
    return out, created


def remove_if_unused(out):
    """After a failed start: the run folder this run created, if nothing but its lock and an empty samples/."""
    with contextlib.suppress(OSError):
        if set(os.listdir(out)) <= {".lock", "samples"} and not os.listdir(os.path.join(out, "samples")):
            shutil.rmtree(out)


def make_configs(args, ds):
    """The model config (the preset, its size flags, the dataset's shape) and the diffusion config."""
    sizes = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None}
    try:
        config = dataclasses.replace(PRESETS[args.model], **sizes, image_size=args.image_size, in_channels=ds.channels,
                                     num_classes=ds.num_classes, class_dropout_prob=args.label_dropout,
                                     learn_sigma=args.learn_sigma)
    except ValueError as e:
        raise UserError(f"{e}; change --image-size, --patch-size, --hidden-size or --num-heads") from None
    return config, DiffusionConfig(num_timesteps=args.num_timesteps, schedule=args.schedule, prediction=args.prediction,
                                   timesteps=args.timesteps, loss_weight=args.loss_weight, snr_gamma=args.snr_gamma)


def build(args, config, rank, device):
    """What a checkpoint holds: the model, its EMA, the optimizer, the GradScaler (fp16) and the batch generator."""
    torch.manual_seed(args.seed)                  # identical initial weights on every rank
    model = DiT(config).to(device)
    torch.manual_seed(args.seed + rank)           # label dropout differs per rank, like its data rows
    amp_dtype, use_scaler = pick_amp(args.amp, device)
    return amp_dtype, {
        "model": model, "ema": copy.deepcopy(model).eval().requires_grad_(False),
        "optimizer": make_optimizer(model, args.lr),
        "scaler": torch.amp.GradScaler("cuda") if use_scaler else None,
        "data_gen": torch.Generator(device).manual_seed(args.seed)}


def make_optimizer(model, lr):
    """AdamW with betas (0.9, 0.99) and no weight decay (as the official DiT: plain Adam on the weights)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def wrap(model, compile, world, device):
    """The module that trains: DDP around the model under torchrun, torch.compile with --compile. Both share
    the model's parameters, and the plain `model` is what is saved."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:         # fallback_random: label dropout draws the random numbers eager PyTorch would
        net = torch.compile(net, options={"fallback_random": True})
    return net


def resume(args, ckpt_path, state, configs, rank, device, say):
    """--resume PATH or auto (OUT/ckpt.pt if it exists): load it into state -> (step, wall time so far, path).
    Its configs must equal the flags' ones: argparse cannot tell a default from a typed flag, so silently
    taking the checkpoint's could ignore one."""
    path = ckpt_path if args.resume == "auto" else args.resume
    if os.path.exists(ckpt_path) and not (path and os.path.exists(path) and os.path.samefile(path, ckpt_path)):
        raise UserError(f"{ckpt_path} exists: this folder holds a run; continue it with --resume auto, or pass "
                        f"another --out for a new one")
    if args.resume == "auto" and not os.path.exists(ckpt_path):
        say(f"--resume auto: no {ckpt_path} yet, starting a new run")
        path = None
    if not path:
        return 0, 0.0, None
    ckpt = load_checkpoint(path)
    if ckpt.get("sampling_only"):
        raise UserError(f"{path} is a sampling-only checkpoint (EMA weights, no optimizer or RNG state): it cannot "
                        f"be resumed; sample or export from it, or train a new run without --resume")
    missing = [k for k in ("ema", "optimizer", "step", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it cannot be resumed (sample from it instead)")
    defaults = config_dict(DiffusionConfig())     # fields newer than the checkpoint take their defaults
    for (what, mine), theirs in zip(configs.items(), (ckpt["model_config"], {**defaults, **ckpt["diffusion_config"]})):
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, flags {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise UserError(f"{path} was trained with another {what} config ({'; '.join(diff)}); resume with "
                            f"the flags of the run that wrote it")
    for name in ("model", "ema", "optimizer"):
        state[name].load_state_dict(ckpt[name])
    if state["scaler"] is not None and ckpt.get("scaler"):
        state["scaler"].load_state_dict(ckpt["scaler"])
    ranks = ckpt["rng"]["ranks"]
    mine = ranks[rank % len(ranks)]                # a run resumed on more ranks reuses the first states
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)
    state["data_gen"].set_state(ckpt["rng"]["data"])
    say(f"resumed {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt.get("wall_time_s", 0.0), path


# ----------------------------------------------------------------------------------------------
#                                         Training
# ----------------------------------------------------------------------------------------------

def train(args, out, rank, world, device):
    t_start, master = time.time(), rank == 0
    say = print if master else (lambda *a, **k: None)
    ckpt_path, log_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.csv")
    ds = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size, channels=args.channels)
    images, labels = ds.images.to(device), ds.labels.to(device)   # all of it, uint8: a batch is one indexing
    config, diff_config = make_configs(args, ds)
    diffusion, (amp_dtype, state) = GaussianDiffusion(diff_config), build(args, config, rank, device)
    model, ema, optimizer, scaler, data_gen = (state[k] for k in ("model", "ema", "optimizer", "scaler", "data_gen"))
    configs = {"model": config_dict(config), "diffusion": config_dict(diff_config)}
    step, wall_before, resumed = resume(args, ckpt_path, state, configs, rank, device, say)
    if step >= args.steps:
        say(f"checkpoint is at step {step} >= --steps {args.steps}: nothing to train (raise --steps)")
        return None, False
    net = wrap(model, args.compile == "on", world, device)
    say(f"{args.model}: {count_parameters(model) / 1e6:.2f}M parameters, {args.prediction}-prediction, {args.dataset} "
        f"{tuple(images.shape)}, batch {args.batch_size} over {world} process(es), {device}, amp {amp_dtype or 'off'}"
        f"{', compiled' if args.compile == 'on' else ''} -> {out}")

    def save(step_done, wall, path=ckpt_path):
        """Checkpoint (rank 0 writes; every rank contributes its RNG state)."""
        states = rng_states(world, device)
        if master:
            save_checkpoint(path, {
                "model_config": config_dict(config), "diffusion_config": config_dict(diff_config),
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "step": step_done, "wall_time_s": wall,
                "rng": {"data": data_gen.get_state(), "ranks": states}, "class_names": ds.class_names,
                "dataset": args.dataset, "args": vars(args)})

    stop = StopFlag("stopping after this step, with a checkpoint (Ctrl-C again to abort)" if master else None)
    last_good = f"{resumed} (step {step})" if resumed else "none was written yet"
    log = None
    limit = 60 * args.max_minutes - (time.time() - t_start) if args.max_minutes else None
    progress = Progress(args.steps, "step ", time_limit=limit, file=sys.stdout,
                        budget=f"--max-minutes {args.max_minutes:g}" if args.max_minutes else None) if master else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    B, local = args.batch_size, slice(rank, None, world)
    losses, skipped, t_log, note = [], 0, time.time(), ""       # since the last log row
    snapshots = [m for m in args.snapshot_minutes or () if 60 * m > wall_before]   # those a resumed run has not passed
    try:
        log = RunLog(log_path, step) if master else None
        # ======================================= the loop =======================================
        while step < args.steps:
            # the global batch, drawn identically on every rank; this rank keeps rows rank::world
            idx = torch.randint(len(images), (B,), generator=data_gen, device=device)[local]
            t = diffusion.draw_timesteps(B, data_gen, device)[local]
            noise = torch.randn((B, *images.shape[1:]), generator=data_gen, device=device)[local]
            x0, y = data.to_model_range(images[idx]), labels[idx]
            lr = learning_rate(args, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                loss = diffusion.training_loss(net, x0, y, t=t, noise=noise)["loss"]
            loss_value = loss.item()
            skipped += optimizer_step(loss, model, optimizer, scaler, args.grad_clip)
            update_ema(ema, model, args.ema_decay, step)
            step += 1

            # NaN, signal, time limit: decided together on all ranks, before anything is saved
            timed_out = args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes
            bad = not math.isfinite(loss_value) and scaler is None   # fp16: GradScaler skips such steps
            snapshot = bool(snapshots) and wall_before + time.time() - t_start >= 60 * snapshots[0]
            bad, stopping, snapshot = over_ranks([bad, stop.signum is not None or timed_out, snapshot], "max", world,
                                                 device)
            if bad:
                raise UserError(f"loss became {loss_value} at step {step}; last good checkpoint: {last_good}; "
                                f"lower --lr or use --amp off")
            losses += [loss_value] if math.isfinite(loss_value) else []
            end, wall, logging = stopping or step == args.steps, wall_before + time.time() - t_start, False
            if step % args.log_every == 0 or end:
                (mean_loss,), logging = over_ranks([sum(losses) / max(len(losses), 1)], "mean", world, device), True
                images_per_s = B * len(losses) / max(time.time() - t_log, 1e-9)
                note = (f" | loss {mean_loss:.4f} | {images_per_s:.0f} img/s | lr {lr:.2e}"
                        + (f" | {skipped} fp16 steps skipped" if skipped else ""))
                if master:
                    log.write(step, mean_loss, lr, images_per_s, wall)
                losses, t_log = [], time.time()
            if master:
                progress.update(step, note, force=logging)
            t_pause = time.time()                   # grids and checkpoints do not count against images/s
            if master and (end or (args.sample_every and step % args.sample_every == 0)):
                sample_grid(ema, diffusion, config, device, os.path.join(out, "samples", f"step_{step:07d}.png"),
                            args.sample_cfg)
            if end or (args.ckpt_every and step % args.ckpt_every == 0):
                save(step, wall)
                last_good = f"{ckpt_path} (step {step})"
            if snapshot:
                save(step, wall, os.path.join(out, f"ckpt_{snapshots.pop(0):g}min.pt"))
            t_log += time.time() - t_pause
            if stopping:
                break
        # ========================================================================================
    except Exception as e:
        if not disk_full(e):
            raise
        raise DiskFull(f"no space left on the disk of {out}; last good checkpoint: {last_good}; free some space, "
                       f"then --resume auto") from None
    finally:
        stop.restore()
        if master:
            progress.close()
        if log:
            log.close()
    why = {None: "done", signal.SIGINT: "stopped by SIGINT", signal.SIGTERM: "stopped by SIGTERM"}[stop.signum]
    if stop.signum is None and step < args.steps:
        why = f"stopped after --max-minutes {args.max_minutes}"
    say(f"{why} at step {step} ({(wall_before + time.time() - t_start) / 60:.1f} min in all); "
        f"checkpoint {ckpt_path}, grids in {os.path.join(out, 'samples')}")
    return stop.signum, step < args.steps


def resume_command(argv, out):
    """The command that continues a run: its own flags, with --resume auto --out OUT."""
    kept, skip = [], False
    for a in argv:
        if skip or a in ("--resume", "--out") or a.startswith(("--resume=", "--out=")):
            skip = a in ("--resume", "--out")
            continue
        kept.append(a)
    return " ".join(["python train.py", *map(shlex.quote, kept), "--resume auto --out", shlex.quote(out)])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rank, world, device = setup_ddp(args.device, args.ddp_timeout)
    try:
        configure(args, world, device, print if rank == 0 else (lambda *a, **k: None))
        out, created = run_folder(args)
        try:
            with RunLock(out) if rank == 0 else contextlib.nullcontext():
                signum, unfinished = train(args, out, rank, world, device)
                if unfinished and rank == 0:
                    print(f"continue it with: {resume_command(argv, out)}")
                if world > 1:
                    dist.barrier()          # no rank tears gloo down while a peer still talks to it
        except BaseException:
            if created and rank == 0:
                remove_if_unused(out)
            raise
    except UserError:
        if rank > 0:
            sys.exit(2)                     # rank 0 prints the one-line message
        raise
    except RuntimeError as e:                # a collective whose peer stopped answering (timeout) or died
        if world > 1 and re.search(r"timed out|connection (closed|reset)|broken pipe", str(e), re.IGNORECASE):
            raise UserError(f"rank {rank}: another DDP process stopped answering for {args.ddp_timeout:g} s "
                            f"(--ddp-timeout) or died; the run stopped: --resume auto continues it from "
                            f"{os.path.join(out, 'ckpt.pt')}") from None
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if signum is not None:
        sys.exit(128 + signum)              # the Unix convention for "ended by a signal" (after saving)


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-size (or --image-size)")
