"""
Measure sample quality with the project's own yardstick: a small MNIST classifier scores generated
digits by conditional accuracy and by the Frechet distance of its features to the real test digits.

    python tools/evaluate.py train-classifier                  # 5 epochs -> tools/mnist_cnn.pt
    python tools/evaluate.py score --ckpt runs/x/ckpt.pt        # sample.py's default setting, 1,000 per class
    python tools/evaluate.py score --ckpt runs/x/ckpt.pt --sampler ddim --steps 25 --cfg-scale 2
    python tools/evaluate.py score --npz samples.npz            # images uint8 (N,1,32,32), labels (N,)
    python tools/evaluate.py table --ckpt runs/x/ckpt.pt --out-md table.md --out-json table.json

MNIST comes from --data-dir (a folder with the official IDX files) or the repository's mnist/.

Metrics (fixed seeds and counts, so runs compare):
  accuracy       share of samples the classifier assigns to the label they were drawn for (per class too);
  FD (MNIST-CNN) Frechet distance between Gaussians fitted to the classifier's penultimate-layer
                 features (128-d) of the samples and of the 10,000 MNIST test digits: FID's recipe
                 (Heusel et al. 2017) with an MNIST network instead of Inception, as in the LeNet-based
                 scores of Binkowski et al. 2018. It is NOT FID and its numbers do not compare with FID;
  floor          the same FD for as many real training digits (same per-class counts): FD is biased
                 upward for small N, so a score is only read against the floor of the same N.
The classifier and the FD code live in mnist_cnn.py; this file draws the samples and makes the tables.
"""
import json
import os
import sys
import time

if __package__ in (None, ""):          # run as a script: the repository's modules, one folder up, and ours
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

from tool_flags import parse_evaluate_args
from support import run_cli

if __name__ == "__main__":
    run_cli(lambda: parse_evaluate_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads

import numpy as np
import torch

from data import to_uint8
from infer_trt import open_backend
from mnist_cnn import CLASSIFIER_PATH, FEATURES, load_classifier, mnist_split, score_images, train_classifier
from sample import TorchBackend, draw_samples, model_from_checkpoint
from speedups import machine_line
from support import (DEFAULT_LOWER_ORDER_FINAL, SAMPLERS, UserError, atomic_write, check_writable,
                     checkpoint_or_shipped, first_line, pick_device, refuse_overwrite)
from tool_flags import KEPT_SAMPLES


# ----------------------------------------------------------------------------------------------
#                                    Drawing samples to score
# ----------------------------------------------------------------------------------------------

def load_generator(args):
    """--ckpt (+ --backend) -> (model_fn(x, t, y), GaussianDiffusion, model config, device)."""
    device = pick_device(args.device)
    model, diffusion, _, ckpt = model_from_checkpoint(args.ckpt, device)
    cfg = model.config
    if ((cfg.in_channels, cfg.image_size, cfg.num_classes) != (1, 32, 10)
            or ckpt.get("dataset", "mnist") != "mnist"):
        raise UserError(f"{args.ckpt} is a {ckpt.get('dataset')} model ({cfg.in_channels}x{cfg.image_size}x"
                        f"{cfg.image_size}, {cfg.num_classes} classes); "
                        f"the MNIST classifier scores MNIST models only")
    if args.backend == "torch":
        return TorchBackend(model), diffusion, cfg, device
    if not args.onnx:       # ONNX Runtime: the exported network behind the same model_fn signature
        raise UserError("--backend ort needs --onnx MODEL.onnx (exported from this checkpoint by export.py)")
    return open_backend("ort", args.onnx, ckpt_path=args.ckpt), diffusion, cfg, device


def parse_setting(text):
    """'ddim-25' or 'ddim-25:100' (100 per class) -> (sampler, steps, per_class or None)."""
    spec, _, per_class = text.strip().partition(":")
    sampler, _, steps = spec.rpartition("-")
    if sampler not in SAMPLERS or not steps.isdigit() or (per_class and not per_class.isdigit()):
        raise UserError(f"bad sampler setting {text!r}; write SAMPLER-STEPS[:PER_CLASS] with SAMPLER one of "
                        f"{', '.join(SAMPLERS)}, e.g. ddim-25 or ddpm-1000:10")
    return sampler, int(steps), int(per_class) if per_class else None


def sample_and_score(model_fn, diffusion, cfg, device, sampler, steps, cfg_scale, per_class, seed, batch_size,
                     data_dir=None, classifier_path=CLASSIFIER_PATH, keep=None,
                     lower_order_final=DEFAULT_LOWER_ORDER_FINAL):
    """Draw per_class digits of each class with one sampler setting, time it, score it ->
    (result dict, images, labels)."""
    lower_order_final = lower_order_final and sampler == "dpm++2m"     # the other samplers have no such step
    # sample.py's labels (0, 1, ..., 9, 0, ...) and sample.draw_samples (all starting noise drawn up front
    # from one CPU generator), so the first digits scored are sample.py's grid for the same seed and setting.
    labels = torch.arange(10 * per_class) % 10
    n = min(batch_size, len(labels)) * (1 if cfg_scale == 1.0 else 2)
    model_fn(torch.zeros(n, 1, 32, 32, device=device), torch.zeros(n, dtype=torch.long, device=device),
             torch.zeros(n, dtype=torch.long, device=device))   # warm-up: one-off setup
                                                                # stays out of the timing
    start, done = time.perf_counter(), []
    try:
        images = draw_samples(model_fn, diffusion, cfg, labels.tolist(), torch.Generator().manual_seed(seed),
                              sampler=sampler, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size,
                              device=device, done=done, lower_order_final=lower_order_final)
    except KeyboardInterrupt:            # Ctrl-C, SIGTERM or SIGHUP: the digits drawn so far are kept
        if keep is not None and done:
            drawn = torch.cat(done)
            saved = save_samples(keep, to_uint8(drawn), labels[:len(drawn)])
            hint = f"score them with --npz {saved}" if len(drawn) > FEATURES else "too few to score"
            print(f"stopped after {len(drawn)} of {len(labels)} digits; they are kept in {saved} ({hint})",
                  file=sys.stderr)
        raise
    seconds = time.perf_counter() - start
    images = to_uint8(images)                           # quantised to uint8 like a saved PNG
    print(f"scoring {len(images)} digits: the classifier, FD against the test digits and the floor",
          file=sys.stderr, flush=True)
    try:
        result = score_images(images, labels, data_dir, classifier_path)
    except (UserError, KeyboardInterrupt) as e:      # minutes of sampling are not thrown away
        if keep is None:
            raise
        saved = save_samples(keep, images, labels)
        if isinstance(e, KeyboardInterrupt):
            print(f"the {len(images)} samples are kept in {saved}", file=sys.stderr)
            raise
        raise UserError(f"{e} (the {len(images)} samples are kept in {saved}: "
                        f"score them with --npz {saved})") from None
    result.update(sampler=sampler, steps=steps, cfg_scale=cfg_scale, lower_order_final=lower_order_final,
                  per_class=per_class, seed=seed, batch_size=batch_size,
                  nfe_per_image=steps * (1 if cfg_scale == 1.0 else 2),
                  wall_s=seconds, wall_s_per_64=seconds / len(labels) * 64)
    return result, images, labels


def save_samples(path, images, labels):
    """Write drawn digits as an .npz that `score --npz` reads -> the path."""
    atomic_write(path, lambda f: np.savez_compressed(f, images=images.numpy(), labels=labels.numpy()))
    return path


def check_before_sampling(args):
    """Everything that can fail after the sampling, checked before it: outputs writable and not inputs, the
    classifier a classifier, the MNIST digits of the floor and the reference present."""
    outputs = {flag: getattr(args, name, None) for flag, name in
               (("--out-json", "out_json"), ("--save-npz", "save_npz"), ("--out-md", "out_md"))}
    for path in filter(None, outputs.values()):
        check_writable(path)
    refuse_overwrite(outputs, {"--ckpt": args.ckpt, "--npz": getattr(args, "npz", None), "--onnx": args.onnx,
                               "--classifier": args.classifier})
    if args.command == "score" and not getattr(args, "npz", None):
        counts = [10 * args.per_class]
    elif args.command == "table":
        settings = [args.sweep_at, *args.rows.split(",")]
        counts = [10 * (parse_setting(r)[2] or args.per_class) for r in settings]
    else:
        counts = []
    if counts and min(counts) <= FEATURES:
        raise UserError(f"{min(counts)} digits cannot give a Frechet distance in {FEATURES} features; draw "
                        f"more than {FEATURES} (--per-class {FEATURES // 10 + 1} or more, per row too)")
    if args.onnx and args.backend != "ort":
        raise UserError("--onnx is run by --backend ort; pass --backend ort, or drop --onnx to sample with "
                        "PyTorch")
    if getattr(args, "resume", False) and not args.out_json:
        raise UserError("--resume reuses the results in --out-json, and none was given; pass --out-json FILE")
    load_classifier(args.classifier)
    for split in ("test", "train"):
        mnist_split(args.data_dir, split)               # cached: the scoring reads the same copy


def load_npz(path):
    """An .npz with `images` (N, 1, 32, 32) uint8, or floats in [-1, 1], and `labels` (N,) -> tensors."""
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except Exception as e:                                # missing, empty, not a zip, no such array, ...
        raise UserError(f"cannot read {path} ({first_line(e)}); "
                        f"pass an .npz with arrays 'images' (N, 1, 32, 32) and 'labels' (N,)") from None
    images = torch.from_numpy(images)
    if images.dim() == 3:
        images = images[:, None]                         # (N, H, W) -> (N, 1, H, W)
    elif images.dim() == 4 and images.shape[-1] == 1:
        images = images.permute(0, 3, 1, 2)              # (N, H, W, 1) -> (N, 1, H, W)
    if images.is_floating_point():
        low, high = (images.min().item(), images.max().item()) if images.numel() else (0.0, 0.0)
        # Digits in [-1, 1] have a background at -1: [0, 1] or [0, 255] arrays would score as other digits.
        if not (-1.001 <= low < 0 and high <= 1.001):
            raise UserError(f"{path}: float images must be in [-1, 1] (the model's range), these span "
                            f"[{low:.3g}, {high:.3g}]; rescale them (x * 2 - 1 for [0, 1]) or save uint8 "
                            f"0-255")
        images = to_uint8(images)
    return images.contiguous(), torch.from_numpy(np.asarray(labels)).long()


def describe(r):
    """One score as printable lines."""
    per = "  ".join(f"{c}:{a:.1%}" for c, a in enumerate(r["per_class_accuracy"]) if a is not None)
    lines = [f"accuracy {r['accuracy']:.2%}  (per class {per})",
             f"FD (MNIST-CNN) {r['fd']:.2f}   floor ({r['n']} real training digits) {r['floor']:.2f}   "
             f"ratio {r['fd'] / r['floor']:.2f}"]
    if "wall_s" in r:
        lines.insert(0, f"{r['sampler']}-{r['steps']}  CFG {r['cfg_scale']:g}  {r['n']} samples "
                        f"({r['per_class']} per class, seed {r['seed']})  NFE/image {r['nfe_per_image']}  "
                        f"{r['wall_s']:.1f} s ({r['wall_s_per_64']:.2f} s per 64 digits, "
                        f"batch {r['batch_size']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
#                                 The quality-versus-cost table
# ----------------------------------------------------------------------------------------------

def pick_recommended(rows, margin_fd, margin_acc):
    """Among the rows of the most common sample count, the best one is that with the lowest FD/floor; return
    the cheapest row (fewest NFE/image, then wall time) whose FD/floor is within margin_fd (relative) of the
    best's and whose accuracy is at most margin_acc below the best's."""
    n = max(set(r["n"] for r in rows), key=lambda k: sum(r["n"] == k for r in rows))
    same = [r for r in rows if r["n"] == n]
    best = min(same, key=lambda r: r["fd"] / r["floor"])
    ok = [r for r in same if r["fd"] / r["floor"] <= best["fd"] / best["floor"] * (1 + margin_fd)
          and r["accuracy"] >= best["accuracy"] - margin_acc]
    return min(ok, key=lambda r: (r["nfe_per_image"], r["wall_s_per_64"]))


def markdown_table(rows, recommended=None):
    head = ("| sampler | CFG | samples (per class) | accuracy | worst class | FD (MNIST-CNN) | "
            "floor (same N) | FD / floor | NFE / image | wall s / 64 digits |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        worst = min(a for a in r["per_class_accuracy"] if a is not None)
        mark = " **(chosen)**" if r is recommended else ""
        body += (f"| {r['sampler']}-{r['steps']}{mark} | {r['cfg_scale']:g} | {r['n']} ({r['per_class']}) | "
                 f"{r['accuracy']:.1%} | {worst:.0%} | {r['fd']:.2f} | {r['floor']:.2f} | "
                 f"{r['fd'] / r['floor']:.2f} | {r['nfe_per_image']} | {r['wall_s_per_64']:.2f} |\n")
    return head + body


def run_table(args):
    """CFG sweep at one setting, then every sampler setting at CFG 1 and at the best scale; print markdown."""
    model_fn, diffusion, config, device = load_generator(args)
    settings = [parse_setting(s) for s in args.rows.split(",")]
    report = {"ckpt": os.path.abspath(args.ckpt), "machine": machine_line(device), "backend": args.backend,
              "seed": args.seed, "batch_size": args.batch_size, "sweep": [], "rows": []}
    done = []   # with --resume: the results of an earlier, interrupted run of the same table, reused below
    if args.resume and args.out_json and os.path.isfile(args.out_json):
        with open(args.out_json) as f:
            old = json.load(f)
        if all(old.get(k) == report[k] for k in ("ckpt", "backend", "seed", "batch_size")):
            done = old["sweep"] + old["rows"]
            print(f"--resume: reusing {len(done)} results from {args.out_json}", flush=True)

    def run(into, sampler, steps, scale, per_class):
        key = (sampler, steps, scale, per_class)
        found = [r for r in done + report["sweep"]
                 if (r["sampler"], r["steps"], r["cfg_scale"], r["per_class"]) == key]
        r = found[0] if found else sample_and_score(model_fn, diffusion, config, device, sampler, steps,
                                                    scale, per_class, args.seed, args.batch_size,
                                                    args.data_dir, args.classifier)[0]
        report[into].append(r)
        print(describe(r), flush=True)
        if args.out_json:   # after every row, so an interrupted table keeps what it measured
            atomic_write(args.out_json, lambda f: json.dump(report, f, indent=1), binary=False)

    sampler, steps, per_class = parse_setting(args.sweep_at)
    per_class = per_class or args.per_class
    for scale in sorted(set([1.0] + list(args.cfg_scales))):
        run("sweep", sampler, steps, scale, per_class)
    # Best scale: the lowest FD (FID's convention). Accuracy alone would pick strong guidance, whose
    # near-identical, over-confident digits saturate accuracy while FD (diversity) gets much worse.
    best = min(report["sweep"], key=lambda r: r["fd"])
    report["best_cfg_scale"] = best["cfg_scale"]
    print(f"best CFG scale at {args.sweep_at}: {best['cfg_scale']:g}", flush=True)
    for sampler, steps, per_class in settings:
        for scale in sorted({1.0, best["cfg_scale"]}):
            run("rows", sampler, steps, scale, per_class or args.per_class)
    chosen = pick_recommended(report["rows"], args.margin_fd, args.margin_acc)
    report["recommended"] = {k: chosen[k] for k in ("sampler", "steps", "cfg_scale")}
    md = (f"Machine: {report['machine']}; backend {args.backend}, batch {args.batch_size}, "
          f"seed {args.seed}.\n\n"
          f"CFG sweep at {args.sweep_at}:\n\n{markdown_table(report['sweep'])}\n"
          f"Sampler settings at CFG 1 and the best scale {best['cfg_scale']:g}:\n\n"
          f"{markdown_table(report['rows'], chosen)}\n"
          f"Chosen: {chosen['sampler']}-{chosen['steps']}, CFG {chosen['cfg_scale']:g}, the fewest NFE/image "
          f"among the {chosen['n']}-sample rows within {args.margin_fd:.0%} of the best FD/floor and "
          f"{args.margin_acc:.1%} of that row's accuracy. Wall times are for this machine and its load at "
          f"the time; NFE/image is the load-free cost.\n")
    print("\n" + md)
    if args.out_md:
        atomic_write(args.out_md, lambda f: f.write(md), binary=False)
    if args.out_json:
        atomic_write(args.out_json, lambda f: json.dump(report, f, indent=1), binary=False)


# ----------------------------------------------------------------------------------------------
#                                          Command line
# ----------------------------------------------------------------------------------------------

def run_score(args):
    if args.npz:
        images, labels = load_npz(args.npz)
        result = score_images(images, labels, args.data_dir, args.classifier)
        print(f"{args.npz}: {result['n']} images")
    else:
        model_fn, diffusion, config, device = load_generator(args)
        result, images, labels = sample_and_score(model_fn, diffusion, config, device, args.sampler,
                                                  args.steps, args.cfg_scale, args.per_class, args.seed,
                                                  args.batch_size, args.data_dir, args.classifier,
                                                  keep=args.save_npz or KEPT_SAMPLES,
                                                  lower_order_final=args.lower_order_final)
        if args.save_npz:
            save_samples(args.save_npz, images, labels)
        result.update(ckpt=os.path.abspath(args.ckpt), backend=args.backend, machine=machine_line(device))
    print(describe(result))
    if args.out_json:
        atomic_write(args.out_json, lambda f: json.dump(result, f, indent=1), binary=False)


def main(argv=None):
    args = parse_evaluate_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command in ("score", "table"):
        args.ckpt = None if getattr(args, "npz", None) else checkpoint_or_shipped(args.ckpt)
        check_before_sampling(args)
    {"train-classifier": train_classifier, "score": run_score, "table": run_table}[args.command](args)


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-size or --per-class")
