"""
Train a class-conditional DiT on MNIST (or any dataset of data.py) in pixel space.

    python train.py                                  # the default model and recipe, batch 128
    python train.py --max-minutes 30                 # stop cleanly after 30 minutes (the CPU run)
    python train.py --resume auto                    # continue OUT/ckpt.pt exactly where it stopped
    python train.py --lesson-recipe                  # the xdiffusion lesson's setup (DiT-S/8, eps, Adam 2e-4)
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, --batch-size is global

Read top to bottom: the pieces of a step -> set-up -> train(), whose loop is { draw batch, loss, step,
EMA, log, sample grid, checkpoint } -> main. The knobs, their defaults and why: recipe.py. The
machinery around the loop (stops, time limit, NaN, DDP agreement, log, files): guard.py. What a
checkpoint holds and what a resume checks: checkpoint.py.

Randomness: each step draws the image indices, timesteps and noise of the whole GLOBAL batch from one
torch.Generator seeded with --seed (identical on every DDP rank), and rank r keeps rows r::world, so the
averaged DDP gradient is the single-process gradient. Only label dropout (inside the model) uses the
global RNG, seeded with seed + rank. Every RNG state is checkpointed: a resume is bit-exact on CPU.
"""
import contextlib
import copy
import dataclasses
import os
import re
import shutil
import sys
import time

from cli import run_cli
from recipe import parse_train_args

if __name__ == "__main__":
    run_cli(lambda: parse_train_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads

import torch
import torch.distributed as dist

import data
from backends import tf32
from checkpoint import (checkpoint_to_resume, config_dict, load_for_resume, restore_training, save_checkpoint,
                        training_state)
from cli import UserError, has_fast_bf16, pick_device
from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, PRESETS, count_parameters
from guard import (RunLock, TrainingGuard, TrainingMeter, disk_full, peer_lost, make_run_folder,
                   remove_if_unused, resume_command, rng_states, setup_ddp)
from recipe import GRID_ROWS, GRID_SEED, GRID_STEPS, check_for_device, for_device
from sample import draw_samples, save_grid

# ----------------------------------------------------------------------------------------------
#                                    The pieces of a step
# ----------------------------------------------------------------------------------------------

def learning_rate(step, lr, warmup):
    """Linear warm-up over `warmup` steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


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
    """EMA of the weights with warm-up: early on (1+k)/(10+k) < decay, so the average forgets the random
    init."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


def sample_grid(ema, diffusion, config, device, path, cfg_scale):
    """A grid from the EMA weights, 8 images per row: row r is class r (the first GRID_ROWS classes)."""
    labels = [r for r in range(min(config.num_classes, GRID_ROWS)) for _ in range(8)]
    images = draw_samples(ema, diffusion, config, labels, torch.Generator().manual_seed(GRID_SEED),
                          sampler="ddim", steps=min(GRID_STEPS, diffusion.num_timesteps), cfg_scale=cfg_scale,
                          batch_size=len(labels), device=device)
    save_grid(images, path, nrow=8)


def every(step, interval):
    """Whether `step` is a multiple of a --*-every interval (0: never)."""
    return interval and step % interval == 0


# ----------------------------------------------------------------------------------------------
#                                           Set-up
# ----------------------------------------------------------------------------------------------

def configure(settings, world, device, say):
    """Threads and the defaults that depend on the device (recipe.for_device) -> the settings."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.model is not None and settings.model not in PRESETS:
        raise UserError(f"unknown --model {settings.model!r}; choose one of {', '.join(PRESETS)}")
    cuda, have_compiler = device.type == "cuda", cpp_compiler() is not None
    settings, notes = for_device(settings, cuda, have_compiler)
    for note in notes:
        say(note)
    check_for_device(settings, cuda, world, have_compiler)      # after the notes, which say what was chosen
    return settings


def cpp_compiler():
    """The C++ compiler torch.compile's CPU backend (Inductor) calls, or None: $CXX, else g++ (clang++ on
    macOS)."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


def pick_amp(flag, device):
    """-> (autocast dtype or None, use GradScaler)."""
    if flag == "auto":
        flag = "off" if device.type != "cuda" else ("bf16" if has_fast_bf16(device) else "fp16")
    if flag == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on CPU")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[flag], flag == "fp16"


def make_configs(s, ds):
    """The model config (the preset, its size flags, the dataset's shape) and the diffusion config."""
    sizes = dict(hidden_size=s.hidden_size, depth=s.depth, num_heads=s.num_heads, patch_size=s.patch_size)
    try:
        config = dataclasses.replace(PRESETS[s.model], **{k: v for k, v in sizes.items() if v is not None},
                                     image_size=s.image_size, in_channels=ds.channels,
                                     num_classes=ds.num_classes, class_dropout_prob=s.label_dropout,
                                     learn_sigma=s.learn_sigma)
    except ValueError as e:
        raise UserError(f"{e}; change --image-size, --patch-size, --hidden-size or --num-heads") from None
    return config, DiffusionConfig(num_timesteps=s.num_timesteps, schedule=s.schedule,
                                   prediction=s.prediction, timesteps=s.timesteps, loss_weight=s.loss_weight,
                                   snr_gamma=s.snr_gamma)


def build(config, seed, lr, amp, rank, device):
    """What a checkpoint holds -> (autocast dtype, {model, ema, optimizer, scaler}, the batch generator)."""
    torch.manual_seed(seed)                       # identical initial weights on every rank
    model = DiT(config).to(device)
    torch.manual_seed(seed + rank)                # label dropout differs per rank, like its data rows
    amp_dtype, use_scaler = pick_amp(amp, device)
    parts = {"model": model, "ema": copy.deepcopy(model).eval().requires_grad_(False),
             "optimizer": make_optimizer(model, lr),
             "scaler": torch.amp.GradScaler("cuda") if use_scaler else None}
    return amp_dtype, parts, torch.Generator(device).manual_seed(seed)


def make_optimizer(model, lr):
    """AdamW with betas (0.9, 0.99) and no weight decay (as the official DiT: plain Adam on the weights)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def wrap(model, compile, world, device):
    """The module that trains: DDP around the model under torchrun, torch.compile with --compile. Both share
    the model's parameters, and the plain `model` is what is saved."""
    net = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:         # fallback_random: label dropout draws the random numbers eager PyTorch would
        net = torch.compile(net, options={"fallback_random": True})
    return net


# ----------------------------------------------------------------------------------------------
#                                          Training
# ----------------------------------------------------------------------------------------------

def train(s, out, rank, world, device):
    """Train with settings s into the run folder out -> (the signal that stopped it or None, unfinished)."""
    t_start, master = time.time(), rank == 0
    say = print if master else (lambda *a, **k: None)
    ckpt_path = os.path.join(out, "ckpt.pt")
    ds = data.load_dataset(s.dataset, s.data_dir, image_size=s.image_size, channels=s.channels)
    images, labels = ds.images.to(device), ds.labels.to(device)   # all of it, uint8: a batch is one indexing
    config, diff_config = make_configs(s, ds)
    diffusion = GaussianDiffusion(diff_config)
    amp_dtype, parts, data_gen = build(config, s.seed, s.lr, s.amp, rank, device)
    model, ema, optimizer, scaler = parts["model"], parts["ema"], parts["optimizer"], parts["scaler"]
    configs = {"model": config_dict(config), "diffusion": config_dict(diff_config)}
    step, wall_before, resumed = 0, 0.0, checkpoint_to_resume(s.resume, ckpt_path, say)
    if resumed:
        ckpt = load_for_resume(resumed, configs)
        restore_training(ckpt, parts, data_gen, rank, device)
        step, wall_before = ckpt["step"], ckpt.get("wall_time_s", 0.0)
        say(f"resumed {resumed} at step {step}")
    if step >= s.steps:
        say(f"checkpoint is at step {step} >= --steps {s.steps}: nothing to train (raise --steps)")
        return None, False
    net = wrap(model, s.compile == "on", world, device)
    say(f"{s.model}: {count_parameters(model) / 1e6:.2f}M parameters, {s.prediction}-prediction, {s.dataset} "
        f"{tuple(images.shape)}, batch {s.batch_size} over {world} process(es), {device}, "
        f"amp {amp_dtype or 'off'}"
        f"{', compiled' if s.compile == 'on' else ''} -> {out}")

    def save(step_done, wall, path=ckpt_path):
        """Checkpoint (rank 0 writes; every rank contributes its RNG state)."""
        rng = {"data": data_gen.get_state(), "ranks": rng_states(world, device)}
        if master:
            save_checkpoint(path, training_state(configs, parts, step_done, wall, rng, ds.class_names,
                                                 s.dataset, dataclasses.asdict(s)))

    guard = TrainingGuard(out, t_start, s.max_minutes, s.snapshot_minutes, wall_before, world, device, master,
                          last_good=f"{resumed} (step {step})" if resumed else "none was written yet")
    budget = f"--max-minutes {s.max_minutes:g}" if s.max_minutes else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    B, mine = s.batch_size, slice(rank, None, world)
    meter = None
    try:
        meter = TrainingMeter(os.path.join(out, "log.csv"), step, s.steps, B, guard.time_left(), budget,
                              world, device, master)
        # ======================================= the loop =======================================
        while step < s.steps:
            # the global batch, drawn identically on every rank; this rank keeps rows rank::world
            idx = torch.randint(len(images), (B,), generator=data_gen, device=device)[mine]
            t = diffusion.draw_timesteps(B, data_gen, device)[mine]
            noise = torch.randn((B, *images.shape[1:]), generator=data_gen, device=device)[mine]
            x0 = data.to_model_range(images[idx])
            y = labels[idx]
            # one optimizer step on the diffusion loss, then the moving average of the weights
            lr = learning_rate(step, s.lr, s.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                loss = diffusion.training_loss(net, x0, y, t=t, noise=noise)["loss"]
            loss_value = loss.item()
            step_skipped = optimizer_step(loss, model, optimizer, scaler, s.grad_clip)
            update_ema(ema, model, s.ema_decay, step)
            step += 1
            # NaN, signal, time limit, snapshot: decided together on all ranks, before anything is saved
            guard.after_step(step, loss_value, fp16=scaler is not None)
            meter.add(loss_value, step_skipped)
            end = guard.stopping or step == s.steps
            wall = guard.wall()
            log_row = end or every(step, s.log_every)
            if log_row:
                meter.write_row(step, lr, wall)
            meter.show(step, force=log_row)
            # grids and checkpoints do not count against images/s
            with meter.paused():
                if master and (end or every(step, s.sample_every)):
                    grid_path = os.path.join(out, "samples", f"step_{step:07d}.png")
                    sample_grid(ema, diffusion, config, device, grid_path, s.sample_cfg)
                if end or every(step, s.ckpt_every):
                    save(step, wall)
                    guard.checkpoint_saved(ckpt_path, step)
                if guard.snapshot_due:
                    save(step, wall, guard.take_snapshot())
            if guard.stopping:
                break
        # ========================================================================================
    except Exception as e:
        if not disk_full(e):
            raise
        raise guard.disk_full_error() from None
    finally:
        guard.close()
        if meter:
            meter.close()
    say(f"{guard.why_stopped(step, s.steps)} at step {step} ({guard.wall() / 60:.1f} min in all); "
        f"checkpoint {ckpt_path}, grids in {os.path.join(out, 'samples')}")
    return guard.signum, step < s.steps


def default_out(model, dataset):
    """runs/<model>-<dataset>, e.g. runs/dit-t-4-mnist."""
    return os.path.join("runs", re.sub(r"[^a-z0-9]+", "-", model.lower()) + "-" + dataset)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_train_args(argv)
    rank, world, device = setup_ddp(pick_device(settings.device), settings.ddp_timeout)
    out = None
    try:
        settings = configure(settings, world, device, print if rank == 0 else (lambda *a, **k: None))
        out = settings.out or default_out(settings.model, settings.dataset)
        created = make_run_folder(out, settings.data_dir)
        try:
            with RunLock(out) if rank == 0 else contextlib.nullcontext():
                # TF32 matmuls on a GPU: free speed where --amp is off, for training only.
                with tf32(device.type == "cuda"):
                    signum, unfinished = train(settings, out, rank, world, device)
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
    except RuntimeError as e:
        if world > 1 and peer_lost(e):
            raise UserError(f"rank {rank}: another DDP process stopped answering for "
                            f"{settings.ddp_timeout:g} s (--ddp-timeout) or died; the run stopped: --resume "
                            f"auto continues it from {os.path.join(out, 'ckpt.pt')}") from None
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if signum is not None:
        sys.exit(128 + signum)              # the Unix convention for "ended by a signal" (after saving)


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-size (or --image-size)")
