"""
How fast each way of running the DiT is, next to the plain PyTorch baseline, measured in one run.

    python tools/bench.py                             # CPU: DiT-T/4 (GPU rows run by themselves on a GPU)
    python tools/bench.py --preset DiT-S/4 --batch-sizes 8,64 --json bench.json
    python tools/bench.py --ckpt runs/cpu-t4/ckpt.pt --ddpm measure
    python tools/bench.py --quick                     # seconds, a tiny model: checks the script, not speed

What is timed, per backend (a way of running the same weights, see speedups.py):
  sampling  one network evaluation at each --batch-sizes (evaluations/s); 64 digits with the default
            sampler (sample.py's, with guidance, so 128-image network batches) and with
            DDPM-1000; how far each backend's digits are from the baseline's (same noise);
  training  one optimiser step at batch 128: images/s, peak memory (GPU: also the largest batch).
The baseline row is eager fp32 PyTorch: no fusion, no compile, no graphs, as the official DiT code runs.
Rows are timed interleaved (every repeat runs each row once, in rotating order) after warm-up, and a
number is the median of the repeats with their spread [min-max]: a busy machine slows all rows alike,
so the ratios hold better than the absolute times. The floor is the counted FLOPs per evaluation
divided by the peak FLOP/s of a large matmul measured in the same run.
"""
import contextlib
import copy
import json
import os
import sys
import tempfile
import time

if __package__ in (None, ""):          # run as a script: the repository's modules, one folder up, and ours
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

from tool_flags import parse_bench_args
from support import run_cli

if __name__ == "__main__":
    run_cli(lambda: parse_bench_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads

import torch

import speedups
import train
from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, DiTConfig, PRESETS, count_parameters
from export import export_onnx
from infer_trt import OrtBackend, TrtBackend
from sample import draw_samples, model_from_checkpoint
from support import (DEFAULT_LOWER_ORDER_FINAL, Progress, UserError, atomic_write, check_sidecar,
                     check_writable, checkpoint_or_shipped, config_dict, load_sidecar, pick_device,
                     refuse_overwrite)

LESSON_STEPS = 30_000           # the xdiffusion lesson's training length
# "Same digits as the baseline": on average within one grey level of 255, and no pixel off by more than
# an eighth of the range (bf16 rounding moves a stroke edge by a fraction of a pixel, not a digit's shape).
SAME_DIGITS_MEAN_LEVELS, SAME_DIGITS_MAX_LEVELS = 1.0, 32.0
QUICK_MODEL = DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=8)


# ----------------------------------------------------------------------------------------------
#                                     Backends under test
# ----------------------------------------------------------------------------------------------

def sampling_backends(device, low, onnx_path, trt_engine, ckpt):
    """name -> (factory(model) -> f(x, t, y), precision of its matmuls). The first is the baseline."""
    lp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(low)
    rows = {"eager": (speedups.eager_fn, "fp32")}
    if device.type == "cpu":
        if lp:
            rows[lp] = (lambda m: speedups.low_precision_fn(m, low), lp)
        rows["compile"] = (speedups.compiled_fn, "fp32")
        if lp:
            rows[f"compile-{lp}"] = (lambda m: speedups.compiled_fn(m, low), lp)
        rows["ort"] = (lambda m: ort_fn(onnx_path(m)), "fp32")
    else:
        rows["tf32"] = (speedups.tf32_fn, "tf32")
        rows[lp] = (lambda m: speedups.low_precision_fn(m, low), lp)
        rows[f"cudagraph-{lp}"] = (lambda m: speedups.cuda_graph_fn(m, low), lp)
        rows[f"compile-{lp}-graphs"] = (lambda m: speedups.compiled_fn(m, low, mode="reduce-overhead"), lp)
        if trt_engine:
            rows["trt-fp16-graphs"] = (lambda m: TrtBackend(trt_engine, cuda_graph=True, ckpt_path=ckpt),
                                       "fp16")
    return rows


def training_backends(device, low):
    """name -> (factory(model) -> (model call, optimizer), precision, changes numerics?)."""
    lp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(low)
    adamw = lambda m: train.make_optimizer(m, lr=1e-3)                  # train.py's optimizer
    rows = {"eager": (lambda m: (m, adamw(m)), "fp32", False),
            "compile": (lambda m: (speedups.training_fn(m), adamw(m)), "fp32", False)}
    if lp:
        rows[f"amp-{lp}"] = (lambda m: (speedups.training_fn(m, compile=False, amp_dtype=low), adamw(m)),
                             lp, True)
        rows[f"compile+amp-{lp}"] = (lambda m: (speedups.training_fn(m, amp_dtype=low), adamw(m)), lp, True)
    return rows


def ort_fn(path):
    """infer_trt.OrtBackend on the CPU with speedups.ort_session_options (threads and spinning as the torch
    rows)."""
    return OrtBackend(path, providers=["CPUExecutionProvider"], meta={"source": "bench.py export"},
                      session_options=speedups.ort_session_options())


def export_fp32_onnx(model, folder):
    """fp32 ONNX of the model with a dynamic batch, as export.py writes model.onnx (opset 20)."""
    path, c = os.path.join(folder, "bench.onnx"), model.config
    example = (torch.randn(2, *c.image_shape), torch.zeros(2, dtype=torch.long),
               torch.zeros(2, dtype=torch.long))
    with contextlib.redirect_stdout(None):
        export_onnx(model.eval(), path, example, opset=20)
    return path


# ----------------------------------------------------------------------------------------------
#                                       The three benchmarks
# ----------------------------------------------------------------------------------------------

def bench_evaluations(fns, model, batch_sizes, args, device, sync):
    """One network evaluation per backend and batch size: evaluations/s, ratio, agreement with the
    baseline."""
    rows, c, gen = [], model.config, torch.Generator().manual_seed(0)
    for n in batch_sizes:
        x = torch.randn(n, *c.image_shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (n,), generator=gen).to(device)
        y = torch.randint(0, c.num_classes, (n,), generator=gen).to(device)
        outs, setup = {}, {}
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            outs[name] = fn(x, t, y).float()            # first call: compiles / captures / allocates
            sync()
            setup[name] = time.perf_counter() - start
            for _ in range(args.warmup):
                fn(x, t, y)
        one = min(speedups.interleaved({"eager": lambda: fns["eager"](x, t, y)}, 3, sync)["eager"])
        iters = max(1, min(200, round(args.target_seconds / one)))
        times = speedups.interleaved({name: (lambda fn=fn: [fn(x, t, y) for _ in range(iters)])
                                      for name, fn in fns.items()}, args.repeats, sync)
        for name in fns:
            s = speedups.spread(times[name], 1000 / iters)
            rows.append({"backend": name, "batch": n, "ms_per_eval": s, "evals_per_s": 1000 / s["median"],
                         "max_abs_diff": (outs[name] - outs["eager"]).abs().max().item(),
                         "first_call_s": setup[name], "iters": iters})
    return rows


def sample_digits(fn, diffusion, config, args, device, sampler, steps):
    """args.digits images (labels 0, 1, 2, ...) as sample.py draws them, from seed 0: the same start for
    every backend."""
    labels = [i % config.num_classes for i in range(args.digits)]
    return draw_samples(fn, diffusion, config, labels, torch.Generator().manual_seed(0), sampler=sampler,
                        steps=steps, cfg_scale=args.cfg_scale, batch_size=args.digits, device=device,
                        lower_order_final=DEFAULT_LOWER_ORDER_FINAL)


def bench_sampling(fns, model, diffusion, args, device, sync):
    """args.digits digits with the default sampler (interleaved repeats) and DDPM-1000 (measured once or
    estimated)."""
    images = {}
    run = lambda name: images.__setitem__(name, sample_digits(fns[name], diffusion, model.config, args,
                                                              device, args.sampler, args.steps))
    times = speedups.interleaved({name: (lambda name=name: run(name)) for name in fns},
                                 args.sample_repeats, sync)
    rows = []
    for name in fns:
        levels = (images[name] - images["eager"]).abs() * 127.5          # [-1, 1] -> 0..255 grey levels
        rows.append({"backend": name, "seconds": speedups.spread(times[name]),
                     "max_diff_levels": levels.max().item(), "mean_diff_levels": levels.mean().item(),
                     "same_digits": levels.mean().item() <= SAME_DIGITS_MEAN_LEVELS
                     and levels.max().item() <= SAME_DIGITS_MAX_LEVELS})
    measure = [b for b in args.ddpm_backends.split(",") if b in fns] if args.ddpm == "measure" else []
    for row in rows:
        if row["backend"] in measure:
            sync()
            start = time.perf_counter()
            sample_digits(fns[row["backend"]], diffusion, model.config, args, device, "ddpm",
                          diffusion.num_timesteps)
            sync()
            row["ddpm_seconds"], row["ddpm_how"] = time.perf_counter() - start, "measured once"
        elif args.ddpm != "off":
            per_step = row["seconds"]["median"] / args.steps
            row["ddpm_seconds"], row["ddpm_how"] = per_step * diffusion.num_timesteps, "estimated"
    return rows


def bench_training(makers, model, diffusion, args, device, sync):
    """One AdamW step (loss, backward, clip, update) at args.train_batch on random images, per backend."""
    c, n = model.config, args.train_batch
    x0 = (torch.rand(n, *c.image_shape) * 2 - 1).to(device)
    y = torch.randint(0, c.num_classes, (n,)).to(device)
    steps, rows = {}, []
    for name, (make, _, _) in makers.items():
        net = copy.deepcopy(model).train()
        fn, opt = make(net)

        def step(fn=fn, opt=opt, net=net, x0=x0, y=y):      # train.py's step: backward, clip 1.0, update
            train.optimizer_step(diffusion.training_loss(fn, x0, y)["loss"], net, opt, None, 1.0)
        sync()
        start = time.perf_counter()
        for _ in range(1 + args.warmup):
            step()
        sync()
        first = time.perf_counter() - start
        resident = sum(p.numel() * p.element_size() for p in net.parameters()) + sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
            if torch.is_tensor(v))
        with speedups.PeakMemory(device) as mem:
            step()
        steps[name] = step
        rows.append({"backend": name, "batch": n, "warmup_s": first, "peak_memory_bytes": resident + mem.peak,
                     "largest_batch": largest_batch(make, model, diffusion, device) if device.type == "cuda"
                     and not name.startswith("compile") else None})
    times = speedups.interleaved(steps, args.repeats, sync)
    for row in rows:
        row["seconds_per_step"] = speedups.spread(times[row["backend"]])
        row["images_per_s"] = n / row["seconds_per_step"]["median"]
    return rows


def largest_batch(make, model, diffusion, device, limit=1 << 15):
    """The largest power-of-two training batch (from 128) whose step fits in GPU memory."""
    net = copy.deepcopy(model).train()
    fn, opt = make(net)
    c, fits, n = model.config, None, 128
    while n <= limit:
        try:
            x0 = torch.zeros(n, *c.image_shape, device=device)
            y = torch.zeros(n, dtype=torch.long, device=device)
            opt.zero_grad(set_to_none=True)
            diffusion.training_loss(fn, x0, y)["loss"].backward()
            opt.step()
            torch.cuda.synchronize()
            fits, n = n, n * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            x0 = y = None
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return fits


# ----------------------------------------------------------------------------------------------
#                                          The report
# ----------------------------------------------------------------------------------------------

def fmt_spread(s, digits=1):
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(header, rows):
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def training_summary(rows, model_name, device, batch):
    """The lesson's training length at the median step time: eager, and the fastest fp32 row if it is
    another."""
    base = rows[0]
    best = max((row for row in rows if not row["changes_numerics"]), key=lambda row: row["images_per_s"])
    hours = lambda row: LESSON_STEPS * row["seconds_per_step"]["median"] / 3600      # noqa: E731
    fastest = "" if best is base else f", {best['backend']} {hours(best):.2f} h"
    return (f"{LESSON_STEPS} steps at batch {batch} (the lesson's training length) for {model_name} "
            f"on this {device}, from the median step time: eager {hours(base):.2f} h{fastest} "
            f"(data loading, EMA and sample grids not included).")


def report(r):
    """The results as markdown: machine, model, peak and floor lines, then one table per benchmark."""
    m, mo, a, peaks = r["machine"], r["model"], r["args"], r["peak_flops"]
    per_digit = a["steps"] * (2 if a["cfg_scale"] != 1 else 1)
    lines = [f"# bench.py: {mo['name']} on {r['device']}", "", f"- command: `{r['command']}`",
             f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, CPU bf16 "
             f"units: {', '.join(m['cpu_bf16']) if isinstance(m['cpu_bf16'], list) else m['cpu_bf16']}, "
             f"GPU: {m['gpu'] or 'none'}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
             + f"; OMP_WAIT_POLICY={m['omp_wait_policy']}; 1-min load average {m['load_average_start']:.1f} "
             f"at start, {m['load_average_end']:.1f} at end "
             f"(above the core count: other processes shared the cores)",
             f"- model: {mo['name']}, {mo['parameters'] / 1e6:.2f} M parameters, weights: {mo['weights']}",
             f"- FLOPs per image and evaluation, counted (FlopCounterMode: matmuls, conv, attention): "
             f"{mo['flops_forward'] / 1e9:.4g} G forward, {mo['flops_train'] / 1e9:.4g} G forward+backward",
             "- peak, best of 5 square matmuls in this run: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s"
                                                                          for k, v in peaks.items())]
    if r["evaluations"]:
        lines += ["", f"## One network evaluation: ms, median of {a['repeats']} interleaved repeats "
                  f"[min-max]"]
        base = {row["batch"]: row["evals_per_s"] for row in r["evaluations"] if row["backend"] == "eager"}
        lines += table(["backend", "batch", "ms / evaluation", "evaluations/s", "x eager", "% of peak",
                        "first call s", "max abs diff vs eager"],
                       [[row["backend"], row["batch"], fmt_spread(row["ms_per_eval"], 2),
                         f"{row['evals_per_s']:.1f}", f"{row['evals_per_s'] / base[row['batch']]:.2f}",
                         f"{row['peak_fraction'] * 100:.0f} %", f"{row['first_call_s']:.1f}",
                         f"{row['max_abs_diff']:.1e}"] for row in r["evaluations"]])
    if r["sampling"]:
        base = r["sampling"][0]
        lines += ["", f"## {a['digits']} digits: seconds, median of {a['sample_repeats']} interleaved "
                  f"repeats [min-max] "
                  f"(guidance doubles the network batch to {a['digits'] * per_digit // a['steps']})"]
        lines += table(["backend", f"{a['sampler']} {a['steps']} steps, cfg {a['cfg_scale']:g}", "x eager",
                        f"DDPM-{r['num_timesteps']}", "x eager",
                        "digits vs eager's: max / mean diff, grey levels",
                        f"same digits (mean <= {SAME_DIGITS_MEAN_LEVELS:g}, "
                        f"max <= {SAME_DIGITS_MAX_LEVELS:g})"],
                       [[row["backend"], fmt_spread(row["seconds"], 2),
                         f"{base['seconds']['median'] / row['seconds']['median']:.2f}",
                         f"{row['ddpm_seconds']:.1f} ({row['ddpm_how']})" if "ddpm_seconds" in row else "-",
                         f"{base['ddpm_seconds'] / row['ddpm_seconds']:.2f}" if "ddpm_seconds" in row
                             else "-",
                         f"{row['max_diff_levels']:.1f} / {row['mean_diff_levels']:.2f}",
                         "yes" if row["same_digits"] else "NO"] for row in r["sampling"]])
        lines += ["", f"Floor, counted FLOPs / measured peak: {a['sampler']} {a['steps']} steps "
                  + ", ".join(f"{v:.3g} s at {k}" for k, v in r["floor"]["sampling_s"].items())
                  + f"; DDPM-{r['num_timesteps']} "
                  + ", ".join(f"{v:.3g} s at {k}" for k, v in r["floor"]["ddpm_s"].items())
                  + f". Network evaluations per digit: {per_digit} vs "
                  f"{per_digit // a['steps'] * r['num_timesteps']} "
                  f"({r['num_timesteps'] / a['steps']:.0f}x fewer; equal quality is evaluate.py's to show)."]
    if r["training"]:
        base = r["training"][0]
        lines += ["", f"## Training step at batch {a['train_batch']}: median of {a['repeats']} interleaved "
                  "repeats [min-max]"]
        lines += table(["backend", "images/s", "s / step", "x eager", "% of peak", "peak memory MiB",
                        "largest batch", "same arithmetic as eager"],
                       [[row["backend"], f"{row['images_per_s']:.0f}", fmt_spread(row["seconds_per_step"], 3),
                         f"{row['images_per_s'] / base['images_per_s']:.2f}",
                         f"{row['peak_fraction'] * 100:.0f} %", f"{row['peak_memory_bytes'] / 2**20:.0f}",
                         row["largest_batch"] or "-",
                         "no (low precision)" if row["changes_numerics"] else "yes (fp32)"]
                        for row in r["training"]])
        lines += ["", training_summary(r["training"], mo["name"], r["device"], a["train_batch"])]
    lines += [""] + [f"- {note}" for note in r["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
#                                            main
# ----------------------------------------------------------------------------------------------

def pick_rows(available, wanted, flag, default):
    """The rows named in a --backends flag, validated, baseline first."""
    if wanted is None:
        return list(default)
    names = [] if wanted == "none" else [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [w for w in names if w not in available]
    if unknown:
        raise UserError(f"{flag}: unknown row {unknown[0]!r} on this device; "
                        f"choose from {', '.join(available)}")
    return ["eager"] + [w for w in names if w != "eager"] if names else []


def check_inputs_and_outputs(args):
    """Before the measuring: the --json output writable and not an input, and --onnx / --trt-engine exported
    from --ckpt (their sidecars name their checkpoint), so no row times another model."""
    inputs = {"--ckpt": args.ckpt, "--onnx": args.onnx, "--trt-engine": args.trt_engine}
    if args.json:
        check_writable(args.json)
        refuse_overwrite({"--json": args.json}, inputs)
    for flag, path in (("--onnx", args.onnx), ("--trt-engine", args.trt_engine)):
        if path and not args.ckpt:
            raise UserError(f"{flag} needs --ckpt, the checkpoint it was exported from (bench compares them)")
        if path:
            check_sidecar(load_sidecar(path), path, ckpt_path=args.ckpt)


def load_model(args, device):
    """(model, diffusion, weights description): trained weights, or random ones where no block is the
    identity."""
    if args.ckpt is None and args.preset is None and not args.quick:
        args.ckpt = checkpoint_or_shipped(None)
    if args.ckpt:
        model, diffusion, _, ckpt = model_from_checkpoint(args.ckpt, device)
        return model, diffusion, f"{args.ckpt} (step {ckpt.get('step')}, EMA)"
    name = args.preset or ("DiT-S/4" if device.type == "cuda" else "DiT-T/4")
    if args.quick:
        config = QUICK_MODEL
    elif name in PRESETS:
        config = PRESETS[name]
    else:
        raise UserError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    torch.manual_seed(0)
    model = DiT(config)
    # A fresh DiT outputs exactly 0 (adaLN-Zero): give the zeroed layers random weights so every block
    # computes something and the digit comparison between backends means something.
    for p in model.parameters():
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    return model.to(device).eval(), GaussianDiffusion(DiffusionConfig()), "random"


def main(argv=None):
    args = parse_bench_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, diffusion, weights = load_model(args, device)
    check_inputs_and_outputs(args)
    preset = "tiny (--quick)" if args.quick else next((k for k, v in PRESETS.items() if v == model.config),
                                                      "custom")
    batch_sizes = args.batch_sizes or ([8, 64, 256] if device.type == "cuda" else [8, 64])
    low = speedups.default_low_precision(device)
    notes, tmp = [], tempfile.TemporaryDirectory(prefix="bench-")

    def onnx_path(m):
        if args.onnx:
            return args.onnx
        start = time.perf_counter()
        path = export_fp32_onnx(copy.deepcopy(m).cpu(), tmp.name)
        notes.append(f"ort: fp32 ONNX exported in {time.perf_counter() - start:.1f} s "
                     f"(opset 20, dynamic batch)")
        return path

    available = sampling_backends(device, low, onnx_path, args.trt_engine, args.ckpt)
    quick_default = [k for k in available if not k.startswith(("compile", "ort"))]
    names = pick_rows(available, args.backends, "--backends", quick_default if args.quick else available)
    if device.type == "cuda" and not args.trt_engine:
        notes.append("trt row not run: pass --trt-engine ENGINE (python export.py --ckpt CKPT builds it)")
    if args.ddpm == "measure":
        ddpm_rows = [w.strip() for w in args.ddpm_backends.split(",") if w.strip()]
        unknown = [w for w in ddpm_rows if w not in names]
        if unknown:
            raise UserError(f"--ddpm-backends: {unknown[0]!r} is not a sampling row of this run; choose from "
                            f"{', '.join(names)}")
    elif args.ddpm_backends != "eager":
        raise UserError("--ddpm-backends applies to --ddpm measure only; pass --ddpm measure or drop it")
    train_available = training_backends(device, low)
    train_names = pick_rows(train_available, args.train_backends, "--train-backends",
                            ["eager"] if args.quick else train_available)

    # Progress on stderr (the report goes to stdout at the end): the phases, with the time they leave.
    progress = Progress(4, "bench phase ", every=0)
    progress.update(0, " | peak FLOP/s and FLOP counts", force=True)
    info = speedups.machine_info(device)
    peak_n = 512 if args.quick else (8192 if device.type == "cuda" else 2048)
    torch.backends.cuda.matmul.allow_tf32 = False         # the fp32 rows are fp32 (only the tf32 row sets it)
    peaks = {"fp32": speedups.measure_matmul_peak(device, torch.float32, n=peak_n)}
    if low is not None:
        peaks[{torch.bfloat16: "bf16", torch.float16: "fp16"}[low]] = speedups.measure_matmul_peak(
            device, low, n=peak_n)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = speedups.measure_matmul_peak(device, torch.float32, n=peak_n)
        torch.backends.cuda.matmul.allow_tf32 = False
    flops = speedups.count_flops(copy.deepcopy(model), 1)
    flops_train = speedups.count_flops(copy.deepcopy(model).train(), 1, backward=True)

    progress.update(1, f" | one network evaluation: {len(names)} backends x batch {batch_sizes}", force=True)
    fns = {name: available[name][0](model) for name in names}
    evaluations = bench_evaluations(fns, model, batch_sizes, args, device, sync) if names else []
    for row in evaluations:
        row["peak_fraction"] = flops * row["batch"] * row["evals_per_s"] / peaks[available[row["backend"]][1]]
    progress.update(2, f" | {args.digits} digits with each backend", force=True)
    sampling = []
    if names:
        c, n_net = model.config, args.digits * (2 if args.cfg_scale != 1 else 1)
        warm = (torch.randn(n_net, *c.image_shape, device=device),
                torch.zeros(n_net, dtype=torch.long, device=device),
                torch.zeros(n_net, dtype=torch.long, device=device))
        for fn in fns.values():
            fn(*warm)                                    # compile / capture the sampling batch before timing
        sampling = bench_sampling(fns, model, diffusion, args, device, sync)
    progress.update(3, f" | the training step: {len(train_names)} rows", force=True)
    makers = {name: train_available[name] for name in train_names}
    training = bench_training(makers, model, diffusion, args, device, sync) if makers else []
    for row in training:
        _, precision, row["changes_numerics"] = makers[row["backend"]]
        row["peak_fraction"] = flops_train * row["images_per_s"] / peaks[precision]
    progress.update(4, " | done", force=True)
    progress.close()
    info["load_average_end"] = os.getloadavg()[0]
    nfe_images = args.digits * (2 if args.cfg_scale != 1 else 1)
    result = {
        "command": " ".join(["python tools/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": str(device), "machine": info, "num_timesteps": diffusion.num_timesteps, "args": vars(args),
        "peak_flops": peaks, "notes": notes,
        "model": {"name": preset, "config": config_dict(model.config), "parameters": count_parameters(model),
                  "weights": weights, "flops_forward": flops, "flops_train": flops_train},
        "floor": {"sampling_s": {k: args.steps * nfe_images * flops / v for k, v in peaks.items()},
                  "ddpm_s": {k: diffusion.num_timesteps * nfe_images * flops / v for k, v in peaks.items()}},
        "evaluations": evaluations, "sampling": sampling, "training": training}
    print(report(result))
    if args.json:
        atomic_write(args.json, lambda f: json.dump(result, f, indent=1), binary=False)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-sizes or --train-batch")
