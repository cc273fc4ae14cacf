"""
Train a class-conditional DiT on MNIST (or any dataset of data.py) in pixel space.

    python train.py                                  # the default model and recipe for this machine
    python train.py --max-minutes 30                 # stop cleanly after 30 minutes, with a checkpoint
    python train.py --resume auto                    # continue OUT/ckpt.pt exactly where it stopped
    python train.py --lesson-recipe                  # the xdiffusion lesson's setup (DiT-S/8, eps, Adam 2e-4)
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, --batch-size is global

Read top to bottom: the knobs (every flag, its default and why) -> the pieces of a step -> set-up ->
train(), whose loop draws a batch, takes an optimizer step on the diffusion loss, updates the EMA and hands
the step to support.TrainingRun, which writes the log, grids and checkpoints and decides when to stop ->
main. What a checkpoint holds: save() in train().

Randomness: each step draws the image indices, timesteps and noise of the whole GLOBAL batch from one
torch.Generator seeded with --seed (identical on every DDP rank), and rank r keeps rows r::world, so the
averaged DDP gradient is the single-process gradient. Only label dropout (inside the model) uses the
global RNG, seeded with seed + rank. Every RNG state is checkpointed: a resume is bit-exact on CPU.
"""
import argparse
import contextlib
import copy
import dataclasses
import os
import re
import shutil
import sys
import time
from typing import Optional

import support
from support import (ArgumentParser, UserError, fraction, minutes_list, nonnegative_float, nonnegative_int,
                     positive_float, positive_int, run_cli)

# ----------------------------------------------------------------------------------------------
#                                          The knobs
# ----------------------------------------------------------------------------------------------

GPU_MODEL, CPU_MODEL = "DiT-S/4", "DiT-T/4"
GPU_STEPS, CPU_MINUTES = 30_000, 30       # the lesson's T4 budget; half an hour on a CPU
GPU_BATCH, CPU_BATCH = 128, 32            # a T4's fill; on a CPU a small batch gives more steps per minute
LESSON_RECIPE = dict(model="DiT-S/8", prediction="eps", batch_size=128, lr=2e-4, warmup=0, label_dropout=0.2)
COMPILE_MIN_STEPS, COMPILE_MIN_MINUTES = 1000, 5   # a CPU compile pays back its start-up only in long runs
# The progress grids: fixed noise and DDIM 25 steps, so that grids compare across steps; a row per class, at
# most 16 rows.
GRID_SEED, GRID_STEPS, GRID_ROWS = 0, 25, 16
# The choices of the flags below, spelled out so that --help answers before PyTorch loads; diffusion.py and
# data.py own them, and tests/test_bad_input.py keeps the copies equal.
PREDICTIONS, SCHEDULES = ("eps", "x0", "v"), ("linear", "cosine")
TIMESTEP_SAMPLINGS, LOSS_WEIGHTS = ("uniform", "logit-normal"), ("none", "min-snr", "v-clipped")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder")


def knob(default, help, **flag):
    """A setting: its default, its flag's help (what it does, and why the default) and argparse options."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass
class TrainSettings:
    """Every knob of train.py, one flag each, in this order (None: decided by the device, see for_device)."""
    # The model: a preset of dit.py, optionally resized.
    model: Optional[str] = knob(
        None, f"a preset of dit.py: DiT-{{S,B,L,XL}}/{{2,4,8}} or DiT-T/4 (None: {GPU_MODEL} on a GPU, as "
        f"patch 4 beats patch 8 at equal parameters, paper Table 4; {CPU_MODEL} on a CPU, which learns MNIST "
        f"in half an hour)")
    hidden_size: Optional[int] = knob(None, "override the preset's width D, for quick experiments",
                                      type=positive_int)
    depth: Optional[int] = knob(None, "override the preset's number of DiT blocks", type=positive_int)
    num_heads: Optional[int] = knob(None, "override the preset's attention heads", type=positive_int)
    patch_size: Optional[int] = knob(None, "override the preset's patch size p", type=positive_int)
    # The data.
    dataset: str = knob("mnist", "what to train on (data.py): MNIST is the lesson's", choices=DATASETS)
    data_dir: Optional[str] = knob(None, "folder with the dataset files (None: the repository's mnist/ for "
                                   "MNIST, else data.py's cache, downloading)")
    image_size: int = knob(32, "images are padded or resized to this size: MNIST's 28 padded to 32 divides "
                           "by patch 2, 4 and 8", type=positive_int)
    channels: Optional[int] = knob(None, "None: the dataset's own; 3 runs the RGB path on MNIST", type=int,
                                   choices=(1, 3))
    # The optimisation.
    batch_size: Optional[int] = knob(
        None, f"GLOBAL batch, split evenly over DDP ranks (None: {GPU_BATCH} on a GPU; {CPU_BATCH} on a CPU, "
        f"where images/s fall far less than the batch)", type=positive_int)
    steps: Optional[int] = knob(
        None, f"total optimizer steps, a resumed run counts on (None: {GPU_STEPS:,} on a GPU; on a CPU as "
        f"many as fit in --max-minutes, {CPU_MINUTES} by default)", type=positive_int)
    lr: float = knob(1e-3, "AdamW learning rate after the warm-up: the best CPU recipe measured",
                     type=positive_float)
    warmup: int = knob(200, "linear learning-rate warm-up steps (0 = none): AdamW's first updates are large",
                       type=nonnegative_int)
    decay_steps: int = knob(0, "let the learning rate fall linearly to 0 over the last this many of --steps "
                            "(0 = constant to the end): a cooldown, whose last steps average the noise out",
                            type=nonnegative_int)
    grad_clip: float = knob(1.0, "max gradient norm (0 = no clipping): guards the early steps against spikes",
                            type=nonnegative_float)
    # The diffusion: DiffusionConfig's defaults, which a test keeps equal.
    prediction: str = knob("x0", "what the network predicts: x0 draws digits in CPU minutes, eps (the "
                           "lesson's) does not", choices=PREDICTIONS)
    schedule: str = knob("linear", "noise schedule: DDPM's linear 1e-4 -> 0.02 (the lesson's) or IDDPM's "
                         "cosine", choices=SCHEDULES)
    num_timesteps: int = knob(1000, "T, the diffusion's number of steps", type=positive_int)
    timestep_sampling: str = knob("uniform", "how training draws t: DDPM's uniform, or SD3's logit-normal "
                                  "(more of the middle)", choices=TIMESTEP_SAMPLINGS,
                                  aliases=("--timesteps",))
    loss_weight: str = knob("none", "weighting of the loss over t: none is DDPM's L_simple",
                            choices=LOSS_WEIGHTS)
    snr_gamma: float = knob(5.0, "the clip of --loss-weight min-snr and v-clipped (Hang et al. 2023)",
                            type=positive_float)
    # The conditioning, and the weights that sample.
    learn_sigma: bool = knob(False, "also learn the variance (IDDPM's hybrid loss)", action="store_true")
    label_dropout: float = knob(0.1, "share of labels replaced by the null class: trains classifier-free "
                                "guidance", type=fraction)
    ema_decay: float = knob(0.999, "decay of the weights' moving average that samples, for a short run (the "
                            "paper's 0.9999 would still hold the initial weights)", type=fraction)
    lesson_recipe: bool = knob(False, "the xdiffusion lesson's setup: " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in LESSON_RECIPE.items()), action="store_true")
    # The run.
    out: Optional[str] = knob(None, "run folder (None: runs/<model>-<dataset>)")
    resume: Optional[str] = knob(None, "checkpoint to continue, or 'auto' = OUT/ckpt.pt if it exists")
    device: Optional[str] = knob(None, "cpu, cuda, cuda:N (None: cuda if available)")
    seed: int = knob(0, "one seed for the weights, batches, noise and label dropout: runs repeat", type=int)
    sample_every: int = knob(1000, "steps between sample grids, a row of 8 per class (0 = only at the end)",
                             type=nonnegative_int)
    sample_cfg: float = knob(1.0, "guidance scale of those grids: unguided, they show the model as it is",
                             type=nonnegative_float)
    ckpt_every: int = knob(1000, "steps between checkpoints (0 = only at the end): what a crash can cost",
                           type=nonnegative_int)
    snapshot_minutes: Optional[tuple] = knob(
        None, "also keep the checkpoint as OUT/ckpt_<M>min.pt when the run's wall time passes each of these "
        "minutes, e.g. 10,30,60 (a quality-versus-time curve)", type=minutes_list)
    log_every: int = knob(50, "steps between log.csv rows and progress lines", type=positive_int)
    amp: str = knob("auto", "mixed precision; auto: bf16 on GPUs that have it, fp16 + GradScaler on others "
                    "(T4), off on a CPU", choices=("auto", "off", "fp16", "bf16"))
    compile: str = knob(
        "auto", f"torch.compile the model for training: faster steps, same math (auto: on a CPU for runs of "
        f"{COMPILE_MIN_STEPS:,}+ steps and {COMPILE_MIN_MINUTES}+ minutes, where the compile time pays back)",
        choices=("auto", "on", "off"), nargs="?", const="on")
    threads: Optional[int] = knob(None, "CPU threads (None: torch's, one per core)", type=positive_int)
    max_minutes: Optional[float] = knob(None, f"stop cleanly after this wall time, with a checkpoint (None: "
                                        f"no limit, but {CPU_MINUTES} on a CPU without --steps)",
                                        type=positive_float)
    ddp_timeout: float = knob(300, "seconds a DDP process waits for the others before it gives up: long "
                              "enough for a checkpoint or a grid on rank 0", type=positive_float)


def train_parser():
    p = ArgumentParser(description="Train a class-conditional DiT (see the module docstring).")
    for field in dataclasses.fields(TrainSettings):
        options = dict(field.metadata)
        aliases = options.pop("aliases", ())
        p.add_argument("--" + field.name.replace("_", "-"), *aliases, default=field.default, **options)
    return p


def parse_args(argv):
    """train.py's flags -> TrainSettings; --lesson-recipe replaces the defaults, explicit flags still win."""
    settings = TrainSettings(**vars(train_parser().parse_args(argv)))
    if settings.lesson_recipe:
        quiet = train_parser()              # the flags parsed again with every default hidden: what was typed
        for action in quiet._actions:
            action.default = argparse.SUPPRESS
        typed = set(vars(quiet.parse_args(argv)))
        settings = dataclasses.replace(settings, **{k: v for k, v in LESSON_RECIPE.items() if k not in typed})
    return settings


def for_device(settings, cuda, have_compiler):
    """The defaults that depend on the device -> (settings, notes to print). A CPU gets the small model at
    batch 32 for half an hour, not the GPU's 30k steps (most of a day on a CPU), and as many steps as fit in
    its time limit; torch.compile where it pays back. have_compiler: a C++ compiler for its CPU backend."""
    notes, chosen = [], []
    if not cuda and settings.model is None:
        chosen.append(f"the CPU model {CPU_MODEL}")
    if not cuda and settings.batch_size is None:
        chosen.append(f"at batch {CPU_BATCH}")
    max_minutes = settings.max_minutes
    if not cuda and settings.steps is None and settings.max_minutes is None:
        max_minutes = CPU_MINUTES
        chosen.append(f"for {CPU_MINUTES} minutes")
    if chosen:
        notes.append(f"no CUDA GPU: training {' '.join(chosen)} (the CPU defaults; --model, --batch-size, "
                     f"--steps and --max-minutes choose)")
    steps = settings.steps or (sys.maxsize if not cuda and max_minutes else GPU_STEPS)
    compile = settings.compile
    if compile == "auto":
        short = steps < COMPILE_MIN_STEPS or (max_minutes or float("inf")) < COMPILE_MIN_MINUTES
        compile = "off" if cuda or short else "on"
        if compile == "on" and not have_compiler:
            compile = "off"
            notes.append("no C++ compiler found for torch.compile (install g++ or set $CXX): training "
                         "without --compile")
    model = settings.model or (GPU_MODEL if cuda else CPU_MODEL)
    batch_size = settings.batch_size or (GPU_BATCH if cuda else CPU_BATCH)
    resolved = dataclasses.replace(settings, model=model, batch_size=batch_size, steps=steps,
                                   max_minutes=max_minutes, compile=compile)
    return resolved, notes


def check_for_device(settings, cuda, world, have_compiler):
    """Refuse resolved settings this machine cannot run, each with a one-line error."""
    if settings.compile == "on" and not cuda and not have_compiler:
        raise UserError("--compile needs a C++ compiler on a CPU (install g++ or set $CXX), or pass "
                        "--compile off")
    if settings.batch_size % world:
        raise UserError(f"--batch-size {settings.batch_size} is not divisible by the {world} DDP processes")
    if settings.decay_steps and settings.steps == sys.maxsize:
        raise UserError("--decay-steps counts back from --steps, and a time-limited CPU run has none: pass "
                        "--steps too")
    if settings.decay_steps > settings.steps:
        raise UserError(f"--decay-steps {settings.decay_steps} exceeds --steps {settings.steps}: the decay "
                        f"counts back from the last step; lower it")


if __name__ == "__main__":
    run_cli(lambda: parse_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads

# ruff: noqa: E402
# PyTorch and the modules that use it load only here, after the flags.
import torch
import torch.distributed as dist

import data
from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, PRESETS, count_parameters
from sample import draw_samples, save_grid, tf32

# ----------------------------------------------------------------------------------------------
#                                    The pieces of a step
# ----------------------------------------------------------------------------------------------

def learning_rate(step, lr, warmup, steps, decay_steps):
    """Linear warm-up over `warmup` steps, then constant; with decay_steps, a linear fall to 0 over the last
    decay_steps of `steps` (a warm-up, stable, decay schedule)."""
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return lr * (min(factor, (steps - step) / decay_steps) if decay_steps else factor)


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


# ----------------------------------------------------------------------------------------------
#                                           Set-up
# ----------------------------------------------------------------------------------------------

def configure(settings, world, device, say):
    """Threads and the defaults that depend on the device (for_device) -> the settings."""
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
        flag = "off" if device.type != "cuda" else ("bf16" if support.has_fast_bf16(device) else "fp16")
    if flag == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on CPU")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[flag], flag == "fp16"


def make_configs(settings, ds):
    """The model config (the preset, its size flags, the dataset's shape) and the diffusion config."""
    sizes = {k: getattr(settings, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")}
    resized = {k: v for k, v in sizes.items() if v is not None}
    try:
        config = dataclasses.replace(PRESETS[settings.model], **resized,
                                     image_size=settings.image_size, in_channels=ds.channels,
                                     num_classes=ds.num_classes, class_dropout_prob=settings.label_dropout,
                                     learn_sigma=settings.learn_sigma)
    except ValueError as e:
        raise UserError(f"{e}; change --image-size, --patch-size, --hidden-size or --num-heads") from None
    fields = ("num_timesteps", "schedule", "prediction", "timestep_sampling", "loss_weight", "snr_gamma")
    return config, DiffusionConfig(**{k: getattr(settings, k) for k in fields})


def build(config, seed, lr, use_scaler, rank, device):
    """The model, its EMA copy, the optimizer, the fp16 GradScaler or None, and the generator of every batch's
    indices, timesteps and noise."""
    torch.manual_seed(seed)                       # identical initial weights on every rank
    model = DiT(config).to(device)
    torch.manual_seed(seed + rank)                # label dropout differs per rank, like its data rows
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    return model, ema, make_optimizer(model, lr), scaler, torch.Generator(device).manual_seed(seed)


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

def train(settings, out, rank, world, device):
    """Train into the run folder out -> (the signal that stopped it or None, whether it is unfinished)."""
    t_start, master = time.time(), rank == 0
    say = print if master else (lambda *a, **k: None)
    ds = data.load_dataset(settings.dataset, settings.data_dir, image_size=settings.image_size,
                           channels=settings.channels)
    images, labels = ds.images.to(device), ds.labels.to(device)   # all of it, uint8: a batch is one indexing
    config, diffusion_config = make_configs(settings, ds)
    diffusion = GaussianDiffusion(diffusion_config)
    amp_dtype, use_scaler = pick_amp(settings.amp, device)
    model, ema, optimizer, scaler, batch_rng = build(config, settings.seed, settings.lr, use_scaler, rank,
                                                     device)
    configs = {"model": support.config_dict(config), "diffusion": support.config_dict(diffusion_config)}
    ckpt_path = os.path.join(out, "ckpt.pt")
    step, wall_before, resumed = 0, 0.0, support.checkpoint_to_resume(settings.resume, ckpt_path, say)
    if resumed:
        # The same run continues: its configs must be the flags' ones, then every state comes back.
        defaults = {"model": {}, "diffusion": support.config_dict(DiffusionConfig())}
        ckpt = support.load_for_resume(resumed, configs, defaults, (settings.dataset, ds.class_names),
                                       dataclasses.asdict(settings), say)
        for part, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer")):
            part.load_state_dict(ckpt[key])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        support.restore_rng_states(ckpt["rng"], batch_rng, rank, device)
        step, wall_before = ckpt["step"], ckpt.get("wall_time_s", 0.0)
        say(f"resumed {resumed} at step {step}")
    if step >= settings.steps:
        say(f"checkpoint is at step {step} >= --steps {settings.steps}: nothing to train (raise --steps)")
        return None, False
    net = wrap(model, settings.compile == "on", world, device)
    say(f"{settings.model}: {count_parameters(model) / 1e6:.2f}M parameters, {settings.prediction}-"
        f"prediction, {settings.dataset} {tuple(images.shape)}, batch {settings.batch_size} over {world} "
        f"process(es), {device}, amp {amp_dtype or 'off'}{', compiled' if settings.compile == 'on' else ''} "
        f"-> {out}")

    def save(path, step_done, wall, rng=None):
        """A checkpoint: what sample.py and export.py rebuild the model from, and all an exact resume needs.
        Every rank takes part (each adds its RNG state) unless rng is given; rank 0 writes. The RNG states are
        the batch generator's and every rank's global one, which draws the label dropout."""
        rng = rng or support.rng_states(batch_rng, world, device)
        if master:
            support.save_checkpoint(path, {
                "model_config": configs["model"], "diffusion_config": configs["diffusion"],   # as dicts
                "model": model.state_dict(), "ema": ema.state_dict(),      # the EMA weights are what samples
                "optimizer": optimizer.state_dict(),                        # AdamW's moments
                "scaler": scaler.state_dict() if scaler else None,          # fp16's GradScaler, or None
                "step": step_done, "wall_time_s": wall,                     # where the run is
                "rng": rng,                                                 # every generator, every rank
                "class_names": ds.class_names, "dataset": settings.dataset,  # what the labels mean
                "args": dataclasses.asdict(settings)})                      # every setting of the run

    def grid(path):
        sample_grid(ema, diffusion, config, device, path, settings.sample_cfg)

    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    B, my_rows = settings.batch_size, slice(rank, None, world)
    last_good = f"{resumed} (step {step})" if resumed else "none was written yet"
    with support.TrainingRun(out, settings, ckpt_path=ckpt_path, step=step, t_start=t_start,
                             wall_before=wall_before, world=world, device=device, rank=rank, save=save,
                             grid=grid, last_good=last_good, batch_rng=batch_rng) as run:
        # ======================================= the loop =======================================
        while step < settings.steps:
            # The global batch, drawn identically on every rank; this rank keeps rows rank::world.
            idx = torch.randint(len(images), (B,), generator=batch_rng, device=device)[my_rows]
            t = diffusion.draw_timesteps(B, batch_rng, device)[my_rows]
            noise = torch.randn((B, *images.shape[1:]), generator=batch_rng, device=device)[my_rows]
            x0 = data.to_model_range(images[idx])
            y = labels[idx]
            # One optimizer step on the diffusion loss, then the moving average of the weights.
            lr = learning_rate(step, settings.lr, settings.warmup, settings.steps, settings.decay_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                loss = diffusion.training_loss(net, x0, y, t=t, noise=noise)["loss"]
            loss_value = loss.item()
            step_skipped = optimizer_step(loss, model, optimizer, scaler, settings.grad_clip)
            update_ema(ema, model, settings.ema_decay, step)
            step += 1
            # NaN, signal, time limit and snapshot, decided together on all ranks before anything is saved;
            # then the log row, grid and checkpoint that are due.
            if run.after_step(step, loss_value, lr, step_skipped, fp16=scaler is not None):
                break
        # ========================================================================================
    say(run.summary(step))
    return run.signum, step < settings.steps


def default_out(model, dataset):
    """runs/<model>-<dataset>, e.g. runs/dit-t-4-mnist."""
    return os.path.join("runs", re.sub(r"[^a-z0-9]+", "-", model.lower()) + "-" + dataset)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_args(argv)
    rank, world, device = support.setup_ddp(support.pick_device(settings.device), settings.ddp_timeout)
    out = None
    try:
        settings = configure(settings, world, device, print if rank == 0 else (lambda *a, **k: None))
        out = settings.out or default_out(settings.model, settings.dataset)
        created = support.make_run_folder(out, settings.data_dir)
        try:
            with support.RunLock(out) if rank == 0 else contextlib.nullcontext():
                # TF32 matmuls on a GPU: free speed where --amp is off, for training only.
                with tf32(device.type == "cuda"):
                    signum, unfinished = train(settings, out, rank, world, device)
                if unfinished and rank == 0:
                    print(f"continue it with: {support.resume_command(argv, out, world)}")
                if world > 1:
                    dist.barrier()          # no rank tears gloo down while a peer still talks to it
        except BaseException:
            if created and rank == 0:
                support.remove_if_unused(out)
            raise
    except UserError:
        if rank > 0:
            sys.exit(2)                     # rank 0 prints the one-line message
        raise
    except RuntimeError as e:
        if world > 1 and support.peer_lost(e):
            raise UserError(f"rank {rank}: another DDP process stopped answering for "
                            f"{settings.ddp_timeout:g} s (--ddp-timeout) or died; the run stopped"
                            f"{getattr(e, 'saved', '')}; continue it from {os.path.join(out, 'ckpt.pt')} "
                            f"with: {support.resume_command(argv, out, world)}") from None
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if signum is not None:
        sys.exit(128 + signum)              # the Unix convention for "ended by a signal" (after saving)


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-size (or --image-size)")
