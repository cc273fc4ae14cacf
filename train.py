"""
Train a class-conditional DiT on MNIST (or any dataset of data.py) in pixel space.

    python train.py                                  # the default model and recipe, batch 128
    python train.py --max-minutes 30                 # stop cleanly after 30 minutes (the CPU run)
    python train.py --resume auto                    # continue OUT/ckpt.pt exactly where it stopped
    python train.py --seed-recipe                    # the seed lesson's setup (DiT-S/8, eps, Adam 2e-4)
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, --batch-size is global

One training loop, read top to bottom: parse flags -> load the whole dataset onto the device ->
build DiT, diffusion, AdamW, EMA -> (resume) -> loop { draw batch, loss, step, EMA, log,
sample grid, checkpoint } -> final checkpoint and grid.

Why the defaults (measured, /work/shared/notes/cpu_training_findings.md):
  * x0-prediction. In 25 CPU-minutes the same 1.9M-parameter DiT draws no digits with the seed's
    eps-prediction (10-16 % class accuracy) and clean, correctly labelled digits with x0-prediction
    (94 %): plain eps-MSE gives almost no gradient for the label-dependent global shape at high noise.
  * AdamW lr 1e-3, 200-step linear warm-up, no weight decay, betas (0.9, 0.99), grad clip 1.0,
    label dropout 0.1, EMA 0.999 with warm-up: the recipe of the best measured run.
  * A constant learning rate after the warm-up: the EMA already averages the last few hundred
    steps. --lr-decay cosine (to 0 at the end) was measured worse in the 30-minute CPU run (README).
  * DiT-S/4 on a GPU: at equal parameters patch 4 beats patch 8 (paper Table 4); DiT-T/4
    (1.9M parameters) on a CPU, the model the measurements above used.
The seed's exact setup is one flag away: --seed-recipe, which is
    --model DiT-S/8 --prediction eps --lr 2e-4 --warmup 0 --label-dropout 0.2
(explicit flags still override it).

Randomness: each step draws the image indices, timesteps and noise of the whole GLOBAL batch
from one torch.Generator seeded with --seed (identical on every DDP rank), and rank r keeps rows
r::world. So N ranks see exactly the batch one process would see, and the averaged DDP gradient
is the single-process gradient. Only label dropout (inside the model) uses the global RNG, seeded
with seed + rank. Every RNG state is checkpointed: a resumed run continues bit-identically (CPU;
not with --lr-decay cosine and --max-minutes, where the learning rate follows the clock). The
multi-process plumbing (joining the group, agreeing across ranks, per-rank RNG state) is in ddp.py.
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall when cores are shared
import argparse
import contextlib
import csv
import dataclasses
import math
import re
import signal
import sys
import time

import torch
import torch.distributed as dist

import data
import ddp
import speedups
from common import UserError, config_dict, load_checkpoint, run_cli, save_checkpoint, save_grid
from diffusion import PREDICTIONS, DiffusionConfig, GaussianDiffusion
from dit import DiT, DiTConfig, PRESETS, count_parameters

GPU_MODEL = "DiT-S/4"        # paper Table 4: patch 4 beats patch 8 at equal parameters
CPU_MODEL = "DiT-T/4"        # 1.9M parameters: ~2.3 steps/s at batch 128 on 2 CPU cores
SEED_RECIPE = dict(model="DiT-S/8", prediction="eps", lr=2e-4, warmup=0, label_dropout=0.2)
TINY_MODEL = DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=4)  # hidden --tiny: tests only
GRID_SEED, GRID_STEPS = 0, 25  # the progress grids: fixed noise, DDIM 25 steps, so grids compare across steps
CSV_FIELDS = ["step", "loss", "lr", "images_per_s", "wall_time_s"]


# ----------------------------------------------------------------------------------------------
#                                           Flags
# ----------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Train a class-conditional DiT (see the module docstring).")
    a = p.add_argument
    a("--model", default=None, help=f"one of {', '.join(PRESETS)} (default {GPU_MODEL} on a GPU, {CPU_MODEL} on CPU)")
    a("--dataset", default="mnist", choices=data.DATASETS)
    a("--data-dir", default=None, help="folder with the dataset files (default: data.py's cache, downloading)")
    a("--image-size", type=int, default=32)
    a("--channels", type=int, default=None, help="1 or 3 (default: the dataset's own)")
    a("--batch-size", type=int, default=128, help="GLOBAL batch, split evenly over DDP ranks")
    a("--steps", type=int, default=30_000, help="total optimizer steps (a resumed run counts on)")
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=200, help="linear learning-rate warm-up steps (0 = none)")
    a("--lr-decay", default="none", choices=("none", "cosine"),
      help="cosine: lr falls to 0 over --steps, or --max-minutes if that ends first (learning_rate); none: constant")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    a("--prediction", default="x0", choices=PREDICTIONS, help="what the network predicts (x0: see docstring)")
    a("--schedule", default="linear", choices=("linear", "cosine"))
    a("--num-timesteps", type=int, default=1000)
    a("--learn-sigma", action="store_true", help="also learn the variance (IDDPM hybrid loss)")
    a("--label-dropout", type=float, default=0.1, help="share of labels replaced by the null class (for CFG)")
    a("--ema-decay", type=float, default=0.999)
    a("--seed-recipe", action="store_true", help="the seed lesson's setup: " +
      " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SEED_RECIPE.items()))
    a("--out", default=None, help="run folder (default runs/<model>-<dataset>)")
    a("--resume", default=None, help="checkpoint to continue, or 'auto' = OUT/ckpt.pt if it exists")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--seed", type=int, default=0)
    a("--sample-every", type=int, default=1000, help="steps between 8x8 sample grids (0 = only at the end)")
    a("--sample-cfg", type=float, default=1.0, help="classifier-free guidance scale of those grids")
    a("--ckpt-every", type=int, default=1000, help="steps between checkpoints (0 = only at the end)")
    a("--log-every", type=int, default=50)
    a("--amp", default="auto", choices=("auto", "off", "fp16", "bf16"),
      help="auto: bf16 on GPUs that have it, fp16 + GradScaler on others (T4), off on CPU")
    a("--compile", action="store_true", help="torch.compile the training step (1.2x on a 2-core CPU; bench.py)")
    a("--threads", type=int, default=None,
      help="CPU threads (default: torch's, one per core); 1 is much faster when other jobs share the cores")
    a("--max-minutes", type=float, default=None, help="stop cleanly after this wall time, with a checkpoint")
    a("--tiny", action="store_true", help=argparse.SUPPRESS)  # a 2-block, width-32 model for the tests
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seed_recipe:                   # the recipe replaces the defaults; explicit flags still win
        parser.set_defaults(**SEED_RECIPE)
        args = parser.parse_args(argv)
    if args.model is not None and args.model not in PRESETS:
        raise UserError(f"unknown --model {args.model!r}; choose one of {', '.join(PRESETS)}")
    for name in ("steps", "batch_size", "log_every", "num_timesteps"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("warmup", "sample_every", "ckpt_every", "grad_clip"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.label_dropout < 1 or not 0 <= args.ema_decay < 1:
        raise UserError("--label-dropout and --ema-decay must be in [0, 1)")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError(f"--max-minutes must be > 0, got {args.max_minutes}")
    return args


# ----------------------------------------------------------------------------------------------
#                                  Pieces of the training loop
# ----------------------------------------------------------------------------------------------

def pick_amp(flag, device):
    """-> (autocast dtype or None, use GradScaler)."""
    if flag == "auto":
        # bf16 needs Ampere (compute capability 8) or newer; is_bf16_supported() also counts emulation (T4)
        flag = "off" if device.type != "cuda" else ("bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    if flag == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on CPU")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[flag], flag == "fp16"


def learning_rate(args, step, elapsed_s):
    """Linear warm-up, then (--lr-decay cosine) half a cosine from --lr down to 0 at the end of training.

    "The end" is --steps, or --max-minutes of this invocation if that comes first: a CPU run given 30
    minutes cannot know how many steps fit, so its progress is the larger of the step and time fractions.
    Resuming with a larger --steps stretches the cosine: the lr rises again to where the new curve is.
    """
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    if args.lr_decay == "none":
        return lr
    progress = step / args.steps
    if args.max_minutes is not None:
        progress = max(progress, elapsed_s / (60 * args.max_minutes))
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """EMA of the weights with warm-up: early on (1+k)/(10+k) < decay, so the average forgets the random init."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


@torch.no_grad()
def sample_grid(ema, diffusion, config, device, path, cfg_scale):
    """8x8 grid from the EMA weights: row r is class r (cycling when there are fewer than 8 classes)."""
    y = torch.tensor([r % config.num_classes for r in range(8) for _ in range(8)], device=device)
    images = diffusion.sample(ema, (64, config.in_channels, config.image_size, config.image_size), y,
                              sampler="ddim", steps=GRID_STEPS, cfg_scale=cfg_scale, null_class=config.null_class,
                              generator=torch.Generator().manual_seed(GRID_SEED), device=device)
    save_grid(images, path, nrow=8)


def truncate_log(path, step):
    """On resume, drop log rows written after the checkpoint (a killed run may have logged further)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


def original_flags(saved):
    """The flags that decide the model and diffusion configs, as the checkpoint's run gave them."""
    names = ("model", "dataset", "image_size", "channels", "prediction", "schedule", "num_timesteps", "label_dropout")
    flags = [f"--{k.replace('_', '-')} {saved[k]}" for k in names if saved.get(k) is not None]
    return " ".join(flags + [f"--{k.replace('_', '-')}" for k in ("learn_sigma", "tiny") if saved.get(k)])


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits. A second signal kills."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
#                                         Training
# ----------------------------------------------------------------------------------------------

def train(args, rank, world, device):
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    master = rank == 0
    if device.type == "cuda":                     # TF32 matmuls: free speed where --amp is off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    say = print if master else (lambda *a, **k: None)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} DDP processes")
    if args.model is None:
        args.model = GPU_MODEL if device.type == "cuda" else CPU_MODEL
        if device.type != "cuda":
            say(f"no CUDA GPU: training the CPU default model {CPU_MODEL} (pass --model to choose)")
    out = args.out or os.path.join("runs", re.sub(r"[^a-z0-9]+", "-", args.model.lower()) + "-" + args.dataset)
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {out}: {e.strerror}; pass a writable --out") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"run folder {out} is not writable; pass a writable --out")
    ckpt_path, log_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.csv")

    # ---- data: the whole uint8 set lives on the device; a step is one indexing operation
    ds = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size, channels=args.channels)
    images, labels = ds.images.to(device), ds.labels.to(device)

    # ---- model, diffusion, optimizer, EMA
    preset = TINY_MODEL if args.tiny else PRESETS[args.model]
    config = dataclasses.replace(preset, image_size=args.image_size, in_channels=ds.channels,
                                 num_classes=ds.num_classes, class_dropout_prob=args.label_dropout,
                                 learn_sigma=args.learn_sigma)
    diff_config = DiffusionConfig(num_timesteps=args.num_timesteps, schedule=args.schedule,
                                  prediction=args.prediction, learn_sigma=args.learn_sigma)
    torch.manual_seed(args.seed)                  # identical initial weights on every rank
    model = DiT(config).to(device)
    ema = DiT(config).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    diffusion = GaussianDiffusion(diff_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    amp_dtype, use_scaler = pick_amp(args.amp, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    data_gen = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed + rank)           # label dropout differs per rank, like its data rows
    step, wall_before = 0, 0.0

    # ---- resume: the flags must describe the same model and diffusion as the checkpoint
    resume = ckpt_path if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.exists(ckpt_path):
        say(f"--resume auto: no {ckpt_path} yet, starting a new run")
        resume = None
    if resume:
        ckpt = load_checkpoint(resume)
        missing = [k for k in ("ema", "optimizer", "step", "rng") if k not in ckpt]
        if missing:
            raise UserError(f"{resume} lacks {', '.join(missing)}: it cannot be resumed (sample from it instead)")
        for mine, theirs, what in ((config_dict(config), ckpt["model_config"], "model"),
                                   (config_dict(diff_config), ckpt["diffusion_config"], "diffusion")):
            diff = [f"{k}: checkpoint {theirs.get(k)!r}, flags {v!r}" for k, v in mine.items() if theirs.get(k) != v]
            if diff:
                raise UserError(f"{resume} was trained with another {what} config ({'; '.join(diff)}); resume with "
                                f"the original run's flags: {original_flags(ckpt.get('args', {}))}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, wall_before = ckpt["step"], ckpt.get("wall_time_s", 0.0)
        ranks = ckpt["rng"]["ranks"]
        ddp.set_rng_state(ranks[rank % len(ranks)], device)
        data_gen.set_state(ckpt["rng"]["data"])
        say(f"resumed {resume} at step {step}")
        if master:
            truncate_log(log_path, step)
    if step >= args.steps:
        say(f"checkpoint is at step {step} >= --steps {args.steps}: nothing to train (raise --steps)")
        return

    # ---- DDP wrapper and compile: `net` trains, `model` is the plain module that is saved
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:    # fuses forward+backward; same fp32 math and label-dropout draws (speedups.py)
        net = speedups.training_fn(net)
    say(f"{args.model}{' (tiny)' if args.tiny else ''}: {count_parameters(model) / 1e6:.2f}M parameters, "
        f"{args.prediction}-prediction, {args.dataset} {tuple(images.shape)}, batch {args.batch_size}"
        f"{f' over {world} processes' if world > 1 else ''}, device {device}, amp {amp_dtype or 'off'} -> {out}")

    def save(step_done, wall):
        """Checkpoint (rank 0 writes; every rank contributes its RNG state)."""
        states = ddp.gather_rng_states(world, device)
        if master:
            save_checkpoint(ckpt_path, {
                "model_config": config_dict(config), "diffusion_config": config_dict(diff_config),
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "step": step_done, "wall_time_s": wall,
                "rng": {"data": data_gen.get_state(), "ranks": states}, "class_names": ds.class_names,
                "dataset": args.dataset, "args": {k: v for k, v in vars(args).items()}})
        return step_done

    if master:
        new_log = not os.path.exists(log_path)
        log_file = open(log_path, "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(CSV_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(out, "tb"), purge_step=step)
        except ImportError:
            tb = None
    stop = StopFlag()
    last_ckpt = step if resume else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    B, local = args.batch_size, slice(rank, None, world)
    loss_sum, n_losses, skipped, t_log = 0.0, 0, 0, time.time()
    interactive = sys.stdout.isatty()
    try:
        # ======================================= the loop =======================================
        while step < args.steps:
            # the global batch, drawn identically on every rank; this rank keeps rows rank::world
            idx = torch.randint(len(images), (B,), generator=data_gen, device=device)[local]
            t = torch.randint(diffusion.num_timesteps, (B,), generator=data_gen, device=device)[local]
            noise = torch.randn((B, *images.shape[1:]), generator=data_gen, device=device)[local]
            x0, y = data.to_model_range(images[idx]), labels[idx]
            lr = learning_rate(args, step, time.time() - t_start)
            for group in optimizer.param_groups:
                group["lr"] = lr

            with autocast():
                loss = diffusion.training_loss(net, x0, y, t=t, noise=noise)["loss"]
            loss_value = loss.item()
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)     # clip the true gradients, not the scaled ones
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if scaler:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped += scaler.get_scale() < scale   # the scale drops exactly when a step was skipped
            else:
                optimizer.step()
            update_ema(ema, model, args.ema_decay, step)
            step += 1

            # ---- NaN, signal, time limit: decided together on all ranks, before anything is saved
            timed_out = args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes
            bad = not math.isfinite(loss_value) and scaler is None   # fp16: GradScaler skips such steps
            bad, stopping = ddp.any_rank([bad, stop.signum is not None or timed_out], world, device)
            if bad:
                where = f"{ckpt_path} (step {last_ckpt})" if last_ckpt is not None else "none was written yet"
                raise UserError(f"loss became {loss_value} at step {step}; last good checkpoint: {where}; "
                                f"lower --lr or use --amp off")
            if math.isfinite(loss_value):
                loss_sum, n_losses = loss_sum + loss_value, n_losses + 1

            # ---- log, grid, checkpoint
            wall = wall_before + time.time() - t_start
            if step % args.log_every == 0 or step == args.steps or stopping:
                mean_loss = ddp.mean_over_ranks(loss_sum / max(n_losses, 1), world, device)
                ips = B * n_losses / max(time.time() - t_log, 1e-9)
                if master:
                    log.writerow([step, f"{mean_loss:.6g}", f"{lr:.6g}", f"{ips:.1f}", f"{wall:.1f}"])
                    log_file.flush()
                    if tb:
                        tb.add_scalar("loss", mean_loss, step)
                        tb.add_scalar("lr", lr, step)
                    line = (f"step {step}/{args.steps} | loss {mean_loss:.4f} | {ips:.0f} img/s | lr {lr:.2e} | "
                            f"{wall / 60:.1f} min" + (f" | {skipped} fp16 steps skipped" if skipped else ""))
                    print(("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True)
                loss_sum, n_losses, t_log = 0.0, 0, time.time()
            end = stopping or step == args.steps
            t_pause = time.time()               # grids and checkpoints do not count against images/s
            if master and (end or (args.sample_every and step % args.sample_every == 0)):
                sample_grid(ema, diffusion, config, device, os.path.join(out, "samples", f"step_{step:07d}.png"),
                            args.sample_cfg)
            if end or (args.ckpt_every and step % args.ckpt_every == 0):
                last_ckpt = save(step, wall)
            t_log += time.time() - t_pause
            if stopping:
                break
        # ========================================================================================
    finally:
        stop.restore()
        if master:
            log_file.close()
            if tb:
                tb.close()
    if interactive and master:
        print()
    why = {None: "done", signal.SIGINT: "stopped by SIGINT", signal.SIGTERM: "stopped by SIGTERM"}[stop.signum]
    if stop.signum is None and step < args.steps:
        why = f"stopped after --max-minutes {args.max_minutes}"
    say(f"{why} at step {step} ({(wall_before + time.time() - t_start) / 60:.1f} min in all); "
        f"checkpoint {ckpt_path}, grids in {os.path.join(out, 'samples')}")
    return stop.signum


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = ddp.setup_ddp(args.device)
    try:
        signum = train(args, rank, world, device)
        if world > 1:
            dist.barrier()                  # no rank tears gloo down while a peer still talks to it
    except UserError:
        if rank > 0:
            sys.exit(2)                     # rank 0 prints the one-line message
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if signum is not None:
        sys.exit(128 + signum)              # the Unix convention for "ended by a signal" (after saving)


if __name__ == "__main__":
    run_cli(main)
