"""
Measure sample quality with the project's own yardstick: a small MNIST classifier scores generated
digits by conditional accuracy and by the Frechet distance of its features to the real test digits.

    python evaluate.py train-classifier                        # 5 epochs -> assets/mnist_cnn.pt
    python evaluate.py score --ckpt runs/x/ckpt.pt              # sample.py's default setting, 1,000 per class
    python evaluate.py score --ckpt runs/x/ckpt.pt --sampler ddim --steps 25 --cfg-scale 2
    python evaluate.py score --npz samples.npz                  # images uint8 (N,1,32,32), labels (N,)
    python evaluate.py table --ckpt runs/x/ckpt.pt --out-md table.md --out-json table.json

Metrics (fixed seeds and counts, so runs compare):
  accuracy       share of samples the classifier assigns to the label they were drawn for (per class too);
  FD (MNIST-CNN) Frechet distance between Gaussians fitted to the classifier's penultimate-layer
                 features (128-d) of the samples and of the 10,000 MNIST test digits: FID's recipe
                 (Heusel et al. 2017) with an MNIST network instead of Inception, as in the LeNet-based
                 scores of Binkowski et al. 2018. It is NOT FID and its numbers do not compare with FID;
  floor          the same FD for as many real training digits (same per-class counts): FD is biased
                 upward for small N, so a score is only read against the floor of the same N.
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall when cores are shared
import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, UserError, atomic_write, draw_samples,
                    model_from_checkpoint, pick_device, run_cli)
from data import from_model_range, load_dataset, to_model_range
from diffusion import SAMPLERS

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "mnist_cnn.pt")
CLASSIFIER_FORMAT = "mnist-cnn"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "mnist")


# ----------------------------------------------------------------------------------------------
#                                   The MNIST classifier
# ----------------------------------------------------------------------------------------------

class MnistCNN(nn.Module):
    """LeNet-style CNN on 32x32 digits in [-1, 1]: three conv+pool stages, a 128-d feature layer, 10 logits."""

    def __init__(self, feature_dim=128, dropout=0.3):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # (N, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # (N, 64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # (N, 64, 4, 4)
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x):
        """(N, 1, 32, 32) -> (N, 128): the penultimate layer, whose statistics FD compares."""
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))                    # (N, 10) logits


_classifier_cache = {}


def load_classifier(path=CLASSIFIER_PATH):
    """The committed classifier (weights_only load), cached per path; a bad file is a one-line UserError."""
    if path in _classifier_cache:
        return _classifier_cache[path]
    if not os.path.isfile(path):
        raise UserError(f"classifier weights {path} do not exist; run `python evaluate.py train-classifier`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable classifier file ({type(e).__name__}); "
                        f"rerun `python evaluate.py train-classifier`") from None
    if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{path} is not an MNIST classifier written by evaluate.py train-classifier")
    model = MnistCNN()
    model.load_state_dict({k: v.float() for k, v in blob["model"].items()})
    _classifier_cache[path] = (model.eval().to(memory_format=torch.channels_last), blob)   # ~1.6x faster on CPU
    return _classifier_cache[path]


@torch.inference_mode()
def classify(model, images, batch_size=1000):
    """uint8 images (N, 1, 32, 32) -> (logits (N, 10), features (N, 128) float64)."""
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(to_model_range(images[i:i + batch_size]).contiguous(memory_format=torch.channels_last))
        logits.append(model.head(f))
        feats.append(f.double())
    return torch.cat(logits), torch.cat(feats)


def random_shift(x, max_shift, generator):
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], filling with background (-1)."""
    n, c, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * p)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def train_classifier(args):
    """Train MnistCNN on the 60k training digits (shifts of +-2 px), report test accuracy, save small weights."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train = load_dataset("mnist", data_dir=args.data_dir, split="train")
    test = load_dataset("mnist", data_dir=args.data_dir, split="test")
    model = MnistCNN().to(memory_format=torch.channels_last)    # ~2x faster convolutions on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(train.labels) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train.labels), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = random_shift(to_model_range(train.images[idx]), args.max_shift, g).contiguous(
                memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc = (classify(model, test.images)[0].argmax(1) == test.labels).float().mean().item()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.4f}  test accuracy {acc:.4%}  "
              f"{time.time() - start:.0f}s", flush=True)
    blob = {"format": CLASSIFIER_FORMAT, "version": 1,
            "model": {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
            "test_accuracy": acc, "seed": args.seed, "epochs": args.epochs,
            "command": "python evaluate.py " + " ".join(sys.argv[1:]),
            "torch_version": str(torch.__version__)}
    atomic_write(args.out, lambda f: torch.save(blob, f))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB), test accuracy {acc:.4%}")



# ----------------------------------------------------------------------------------------------
#                               Frechet distance and the references
# ----------------------------------------------------------------------------------------------

def feature_statistics(features):
    """(N, D) features -> (mean (D,), covariance (D, D)), float64 numpy, unbiased covariance as in FID."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def sqrtm_psd(m):
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (float64)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) (Heusel et al. 2017, Eq. 6).
    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same eigenvalues, but a symmetric PSD
    matrix, so its root is an eigendecomposition, with no complex parts to discard as scipy's sqrtm has."""
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


_reference_cache = {}   # in memory only: (data_dir, classifier) -> test statistics, floors per class counts


def reference_statistics(data_dir, classifier_path=CLASSIFIER_PATH):
    """Feature mean and covariance of the 10,000 MNIST test digits (the reference of every FD)."""
    key = ("test", os.path.abspath(data_dir), classifier_path)
    if key not in _reference_cache:
        test = load_dataset("mnist", data_dir=data_dir, split="test")
        _reference_cache[key] = feature_statistics(classify(load_classifier(classifier_path)[0], test.images)[1])
    return _reference_cache[key]


def real_floor(counts, data_dir, classifier_path=CLASSIFIER_PATH, seed=0):
    """FD of real TRAINING digits, counts[c] of class c drawn with a fixed seed, against the test digits:
    the best score a sampler can reach with that many samples (FD's small-N bias included)."""
    key = ("floor", os.path.abspath(data_dir), classifier_path, tuple(counts), seed)
    if key not in _reference_cache:
        train_key = ("train", os.path.abspath(data_dir))
        if train_key not in _reference_cache:
            _reference_cache[train_key] = load_dataset("mnist", data_dir=data_dir, split="train")
        train = _reference_cache[train_key]
        g = torch.Generator().manual_seed(seed)
        picked = []
        for c, n in enumerate(counts):
            pool = (train.labels == c).nonzero().flatten()
            if n > len(pool):
                raise UserError(f"{n} samples of class {c} but only {len(pool)} real training digits for the "
                                f"floor; use --per-class {len(pool)} or fewer")
            picked.append(pool[torch.randperm(len(pool), generator=g)[:n]])
        feats = classify(load_classifier(classifier_path)[0], train.images[torch.cat(picked)])[1]
        _reference_cache[key] = frechet_distance(*feature_statistics(feats), *reference_statistics(data_dir, classifier_path))
    return _reference_cache[key]


def score_images(images, labels, data_dir=DEFAULT_DATA_DIR, classifier_path=CLASSIFIER_PATH):
    """uint8 digits (N, 1, 32, 32) drawn for labels (N,) -> dict of accuracy, per-class accuracy, FD and floor."""
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (1, 32, 32):
        raise UserError(f"images must be uint8 (N, 1, 32, 32) MNIST-like digits, got {images.dtype} "
                        f"{tuple(images.shape)}; pad 28x28 digits to 32x32 (data.load_dataset does)")
    if len(images) < 2 or len(labels) != len(images) or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"need >= 2 images and one label 0-9 per image, got {len(images)} images and "
                        f"{len(labels)} labels")
    labels = labels.long()
    logits, feats = classify(load_classifier(classifier_path)[0], images)
    correct = (logits.argmax(1) == labels).double()
    counts = torch.bincount(labels, minlength=10).tolist()
    per_class = [correct[labels == c].mean().item() if counts[c] else None for c in range(10)]
    fd = frechet_distance(*feature_statistics(feats), *reference_statistics(data_dir, classifier_path))
    return {"n": len(images), "counts": counts, "accuracy": correct.mean().item(), "per_class_accuracy": per_class,
            "fd": fd, "floor": real_floor(counts, data_dir, classifier_path)}


# ----------------------------------------------------------------------------------------------
#                                    Drawing samples to score
# ----------------------------------------------------------------------------------------------

def load_generator(args):
    """--ckpt (+ --backend) -> (model_fn(x, t, y), GaussianDiffusion, model config, device)."""
    device = pick_device(args.device)
    model, diffusion, _, ckpt = model_from_checkpoint(args.ckpt, device)
    cfg = model.config
    if (cfg.in_channels, cfg.image_size, cfg.num_classes) != (1, 32, 10) or ckpt.get("dataset", "mnist") != "mnist":
        raise UserError(f"{args.ckpt} is a {ckpt.get('dataset')} model ({cfg.in_channels}x{cfg.image_size}x"
                        f"{cfg.image_size}, {cfg.num_classes} classes); the MNIST classifier scores MNIST models only")
    if args.backend == "torch":
        def model_fn(x, t, y):
            with torch.inference_mode():
                return model(x, t, y)
    else:   # ONNX Runtime: the exported network behind the same model_fn signature
        if not args.onnx:
            raise UserError("--backend ort needs --onnx MODEL.onnx (exported from this checkpoint by export.py)")
        import backends
        model_fn = backends.make_backend("ort", args.onnx, ckpt_path=args.ckpt, device=device)
    return model_fn, diffusion, cfg, device


def parse_setting(text):
    """'ddim-25' or 'ddim-25:100' (100 per class) -> (sampler, steps, per_class or None)."""
    spec, _, per_class = text.strip().partition(":")
    sampler, _, steps = spec.rpartition("-")
    if sampler not in SAMPLERS or not steps.isdigit() or (per_class and not per_class.isdigit()):
        raise UserError(f"bad sampler setting {text!r}; write SAMPLER-STEPS[:PER_CLASS] with SAMPLER one of "
                        f"{', '.join(SAMPLERS)}, e.g. ddim-25 or ddpm-1000:10")
    return sampler, int(steps), int(per_class) if per_class else None


def sample_and_score(model_fn, diffusion, cfg, device, sampler, steps, cfg_scale, per_class, seed, batch_size,
                     data_dir=DEFAULT_DATA_DIR, classifier_path=CLASSIFIER_PATH):
    """Draw per_class digits of each class with one sampler setting, time it, score it -> (result dict, images, labels)."""
    if not 1 <= steps <= diffusion.num_timesteps:
        raise UserError(f"--steps {steps} is outside 1-{diffusion.num_timesteps}, the model's timesteps")
    # sample.py's labels (0, 1, ..., 9, 0, ...) and common.draw_samples (all starting noise drawn up front from
    # one CPU generator), so the first digits scored are sample.py's grid for the same seed and setting.
    labels = torch.arange(10 * per_class) % 10
    n = min(batch_size, len(labels)) * (1 if cfg_scale == 1.0 else 2)
    model_fn(torch.zeros(n, 1, 32, 32, device=device), torch.zeros(n, dtype=torch.long, device=device),
             torch.zeros(n, dtype=torch.long, device=device))   # warm-up: one-off setup stays out of the timing
    start = time.perf_counter()
    images = draw_samples(model_fn, diffusion, cfg, labels.tolist(), torch.Generator().manual_seed(seed),
                          sampler=sampler, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - start
    images = from_model_range(images)                   # quantised to uint8 like a saved PNG
    result = score_images(images, labels, data_dir, classifier_path)
    result.update(sampler=sampler, steps=steps, cfg_scale=cfg_scale, per_class=per_class, seed=seed,
                  batch_size=batch_size, nfe_per_image=steps * (1 if cfg_scale == 1.0 else 2),
                  wall_s=seconds, wall_s_per_64=seconds / len(labels) * 64)
    return result, images, labels


def load_npz(path):
    """An .npz with `images` (N, 1, 32, 32) uint8, or floats in [-1, 1], and `labels` (N,) -> tensors."""
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {path} ({str(e).splitlines()[0][:120]}); pass an .npz with arrays "
                        f"'images' (N, 1, 32, 32) and 'labels' (N,)") from None
    images = torch.from_numpy(images)
    if images.dim() == 3:
        images = images[:, None]                         # (N, H, W) -> (N, 1, H, W)
    elif images.dim() == 4 and images.shape[-1] == 1:
        images = images.permute(0, 3, 1, 2)              # (N, H, W, 1) -> (N, 1, H, W)
    if images.is_floating_point():
        images = from_model_range(images)
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
                        f"{r['wall_s']:.1f} s ({r['wall_s_per_64']:.2f} s per 64 digits, batch {r['batch_size']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
#                                 The quality-versus-cost table
# ----------------------------------------------------------------------------------------------

DEFAULT_ROWS = "ddpm-1000:10,ddpm-250:20,ddim-100:50,ddim-50,ddim-25,ddim-10,dpm++2m-25,dpm++2m-10"


def machine():
    """What the timings ran on, in words."""
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({cpu}), {gpu}, torch {torch.__version__}, threads: {torch.get_num_threads()}"


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
    head = ("| sampler | CFG | samples (per class) | accuracy | worst class | FD (MNIST-CNN) | floor (same N) | "
            "FD / floor | NFE / image | wall s / 64 digits |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        worst = min(a for a in r["per_class_accuracy"] if a is not None)
        mark = " **(chosen)**" if r is recommended else ""
        body += (f"| {r['sampler']}-{r['steps']}{mark} | {r['cfg_scale']:g} | {r['n']} ({r['per_class']}) | "
                 f"{r['accuracy']:.1%} | {worst:.0%} | {r['fd']:.2f} | {r['floor']:.2f} | {r['fd'] / r['floor']:.2f} | "
                 f"{r['nfe_per_image']} | {r['wall_s_per_64']:.2f} |\n")
    return head + body


def run_table(args):
    """CFG sweep at one setting, then every sampler setting at CFG 1 and at the best scale; print markdown."""
    gen = load_generator(args)
    settings = [parse_setting(s) for s in args.rows.split(",")]
    report = {"ckpt": os.path.abspath(args.ckpt), "machine": machine(), "backend": args.backend, "seed": args.seed,
              "batch_size": args.batch_size, "sweep": [], "rows": []}
    done = []   # results to reuse: this table's sweep, and with --resume those of an earlier run of the same table
    if args.resume and args.out_json and os.path.isfile(args.out_json):
        with open(args.out_json) as f:
            old = json.load(f)
        if all(old.get(k) == report[k] for k in ("ckpt", "backend", "seed", "batch_size")):
            done = old["sweep"] + old["rows"]
            print(f"--resume: reusing {len(done)} results from {args.out_json}", flush=True)

    def run(into, sampler, steps, scale, per_class):
        key = (sampler, steps, scale, per_class)
        found = [r for r in done + report["sweep"] if (r["sampler"], r["steps"], r["cfg_scale"], r["per_class"]) == key]
        r = found[0] if found else sample_and_score(*gen, sampler, steps, scale, per_class, args.seed,
                                                  args.batch_size, args.data_dir, args.classifier)[0]
        report[into].append(r)
        print(describe(r), flush=True)
        if args.out_json:   # after every row, so an interrupted table keeps what it measured
            atomic_write(args.out_json, lambda f: json.dump(report, f, indent=1), binary=False)

    sampler, steps, per_class = parse_setting(args.sweep_at)
    per_class = per_class or args.per_class
    for scale in sorted(set([1.0] + [float(s) for s in args.cfg_scales.split(",")])):
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
    md = (f"Machine: {report['machine']}; backend {args.backend}, batch {args.batch_size}, seed {args.seed}.\n\n"
          f"CFG sweep at {args.sweep_at}:\n\n{markdown_table(report['sweep'])}\n"
          f"Sampler settings at CFG 1 and the best scale {best['cfg_scale']:g}:\n\n"
          f"{markdown_table(report['rows'], chosen)}\n"
          f"Chosen: {chosen['sampler']}-{chosen['steps']}, CFG {chosen['cfg_scale']:g}, the fewest NFE/image among the "
          f"{chosen['n']}-sample rows within {args.margin_fd:.0%} of the best FD/floor and {args.margin_acc:.1%} of "
          f"that row's accuracy. Wall times are for this machine and its load at the time; NFE/image is the "
          f"load-free cost.\n")
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
        gen = load_generator(args)
        result, images, labels = sample_and_score(*gen, args.sampler, args.steps, args.cfg_scale, args.per_class,
                                                  args.seed, args.batch_size, args.data_dir, args.classifier)
        if args.save_npz:
            atomic_write(args.save_npz, lambda f: np.savez_compressed(f, images=images.numpy(), labels=labels.numpy()))
        result.update(ckpt=os.path.abspath(args.ckpt), backend=args.backend, machine=machine())
    print(describe(result))
    if args.out_json:
        atomic_write(args.out_json, lambda f: json.dump(result, f, indent=1), binary=False)


def main():
    parser = argparse.ArgumentParser(description="Score generated MNIST digits: conditional accuracy and FD (MNIST-CNN).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-classifier", help="train the MNIST CNN that scores samples")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-shift", type=int, default=2, help="random shifts of +-N pixels (augmentation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=CLASSIFIER_PATH)
    for name in ("score", "table"):
        p = sub.add_parser(name, help="score one sampler setting" if name == "score" else
                           "grid of sampler settings x CFG scales as a markdown table")
        src = p.add_mutually_exclusive_group(required=True) if name == "score" else p
        src.add_argument("--ckpt", required=name == "table", help="checkpoint written by train.py")
        if name == "score":
            src.add_argument("--npz", help="score saved digits: arrays 'images' (N,1,32,32) and 'labels' (N,)")
            p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help="default: sample.py's")
            p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
            p.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG)
            p.add_argument("--per-class", type=int, default=1000, help="samples per class (1000: headline)")
            p.add_argument("--save-npz", help="also write the drawn digits to this .npz")
        else:
            p.add_argument("--per-class", type=int, default=100, help="samples per class unless a row says :N")
            p.add_argument("--rows", default=DEFAULT_ROWS, help="SAMPLER-STEPS[:PER_CLASS],... (default %(default)s)")
            p.add_argument("--cfg-scales", default="1.5,2,3,4", help="CFG scales tried besides 1")
            p.add_argument("--sweep-at", default="ddim-25", help="setting at which CFG scales are compared")
            p.add_argument("--margin-fd", type=float, default=0.10, help="relative FD/floor margin of the choice")
            p.add_argument("--margin-acc", type=float, default=0.005, help="accuracy margin (0.005 = 0.5 points)")
            p.add_argument("--out-md")
            p.add_argument("--resume", action="store_true", help="reuse the results in --out-json of an "
                           "interrupted run (same ckpt, backend, seed, batch size)")
        p.add_argument("--out-json")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=500)
        p.add_argument("--backend", choices=("torch", "ort"), default="torch")
        p.add_argument("--onnx", help="ONNX file exported from --ckpt, for --backend ort")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
        p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with the MNIST IDX files")
        p.add_argument("--classifier", default=CLASSIFIER_PATH)
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's; 1 is faster on a CPU other jobs share)")
    args = parser.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    {"train-classifier": train_classifier, "score": run_score, "table": run_table}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
