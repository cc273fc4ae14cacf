"""
The project's yardstick for MNIST samples: a small classifier it trains itself, and the Frechet
distance in that classifier's features ("FD (MNIST-CNN)", never FID). evaluate.py is the command
line around it; the metrics are defined in its docstring.

    python tools/evaluate.py train-classifier --out my_cnn.pt     # MnistCNN, 5 epochs, a new file
"""
import sys

if __name__ == "__main__":      # run by hand: say what this file is, before importing what it needs
    sys.exit(f"{sys.argv[0]}: a module of tools/evaluate.py (its classifier), not a script; "
             f"run python tools/evaluate.py")

import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import load_dataset, to_model_range
from support import UserError, atomic_write, check_writable, file_sha256

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_cnn.pt")
CLASSIFIER_FORMAT = "mnist-cnn"
FEATURES = 128          # the feature layer whose statistics FD compares
MIN_SCORED = 1000       # below this many images an FD is far from its value at 10,000: a warning says so


# ----------------------------------------------------------------------------------------------
#                                   The MNIST classifier
# ----------------------------------------------------------------------------------------------

class MnistCNN(nn.Module):
    """LeNet-style CNN on 32x32 digits in [-1, 1]: three conv+pool stages, a 128-d feature layer,
    10 logits."""

    def __init__(self, feature_dim=FEATURES, dropout=0.3):
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
        raise UserError(f"classifier weights {path} do not exist; "
                        f"run `python tools/evaluate.py train-classifier`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable classifier file ({type(e).__name__}); "
                        f"rerun `python tools/evaluate.py train-classifier`") from None
    if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{path} is not an MNIST classifier written by evaluate.py train-classifier")
    model = MnistCNN()
    model.load_state_dict({k: v.float() for k, v in blob["model"].items()})
    _classifier_cache[path] = (model.eval().to(memory_format=torch.channels_last), blob)   # faster CPU
                                                                                           # convolutions
    return _classifier_cache[path]


@torch.inference_mode()
def classify(model, images, batch_size=1000):
    """uint8 images (N, 1, 32, 32) -> (logits (N, 10), features (N, 128) float64)."""
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(to_model_range(images[i:i + batch_size]).contiguous(
            memory_format=torch.channels_last))
        logits.append(model.head(f))
        feats.append(f.double())
    return torch.cat(logits), torch.cat(feats)


def random_shift(x, max_shift, generator):
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], filling with
    background (-1)."""
    n, c, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * p)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def train_classifier(args):
    """Train MnistCNN on the 60k training digits (shifts of +-2 px), report test accuracy, save small
    weights into a new file: an existing classifier, the shipped yardstick above all, is never replaced."""
    if os.path.lexists(args.out):
        raise UserError(f"--out {args.out} exists; write the new classifier to a new file (scores name the "
                        f"classifier they used, and --classifier chooses it)")
    check_writable(args.out, "--out")
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train = load_dataset("mnist", data_dir=args.data_dir, split="train")
    test = load_dataset("mnist", data_dir=args.data_dir, split="test")
    model = MnistCNN().to(memory_format=torch.channels_last)    # faster convolutions on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(train.labels) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr,
                                                total_steps=args.epochs * steps_per_epoch)
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
            "command": "python tools/evaluate.py " + " ".join(sys.argv[1:]),
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


def mnist_split(data_dir, split):
    """One MNIST split, loaded once per process (the floor and the reference both read it)."""
    key = (split, data_dir and os.path.abspath(data_dir))
    if key not in _reference_cache:
        _reference_cache[key] = load_dataset("mnist", data_dir=data_dir, split=split)
    return _reference_cache[key]


def reference_statistics(data_dir, classifier_path=CLASSIFIER_PATH):
    """Feature mean and covariance of the 10,000 MNIST test digits (the reference of every FD)."""
    key = ("test", data_dir and os.path.abspath(data_dir), classifier_path)
    if key not in _reference_cache:
        test = mnist_split(data_dir, "test")
        _reference_cache[key] = feature_statistics(classify(load_classifier(classifier_path)[0],
                                                            test.images)[1])
    return _reference_cache[key]


def real_floor(counts, data_dir, classifier_path=CLASSIFIER_PATH, seed=0):
    """FD of real TRAINING digits, counts[c] of class c drawn with a fixed seed, against the test digits:
    the best score a sampler can reach with that many samples (FD's small-N bias included)."""
    key = ("floor", data_dir and os.path.abspath(data_dir), classifier_path, tuple(counts), seed)
    if key not in _reference_cache:
        train = mnist_split(data_dir, "train")
        g = torch.Generator().manual_seed(seed)
        picked = []
        for c, n in enumerate(counts):
            pool = (train.labels == c).nonzero().flatten()
            if n > len(pool):
                raise UserError(f"{n} samples of class {c} but only {len(pool)} real training digits for the "
                                f"floor; use --per-class {len(pool)} or fewer")
            picked.append(pool[torch.randperm(len(pool), generator=g)[:n]])
        feats = classify(load_classifier(classifier_path)[0], train.images[torch.cat(picked)])[1]
        _reference_cache[key] = frechet_distance(*feature_statistics(feats),
                                                 *reference_statistics(data_dir, classifier_path))
    return _reference_cache[key]


def score_images(images, labels, data_dir=None, classifier_path=CLASSIFIER_PATH):
    """uint8 digits (N, 1, 32, 32) drawn for labels (N,) -> dict of accuracy, per-class accuracy, FD and
    floor."""
    shape = tuple(images.shape)
    if images.dtype != torch.uint8 or images.dim() != 4 or shape[1:] != (1, 32, 32):
        fix = ("the classifier reads 1-channel digits, not RGB images" if images.dim() == 4 and shape[1] == 3
               else "pad 28x28 digits to 32x32 (data.load_dataset does)" if shape[-2:] == (28, 28)
               else "give MNIST-like digits of 32x32, 1 channel")
        raise UserError(f"images must be uint8 (N, 1, 32, 32), got {images.dtype} {shape}: {fix}")
    if len(labels) != len(images) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise UserError(f"need one label 0-9 per image, got {len(images)} images and {len(labels)} labels")
    if len(images) <= FEATURES:
        raise UserError(f"{len(images)} images cannot give a Frechet distance in {FEATURES} features (its "
                        f"covariance needs more images than dimensions); score at least {MIN_SCORED}")
    if len(images) < MIN_SCORED:
        print(f"warning: an FD from {len(images)} images is far above its value at 10,000 and compares only "
              f"with FDs of as many images (its floor is printed beside it)", file=sys.stderr)
    labels = labels.long()
    logits, feats = classify(load_classifier(classifier_path)[0], images)
    correct = (logits.argmax(1) == labels).double()
    counts = torch.bincount(labels, minlength=10).tolist()
    per_class = [correct[labels == c].mean().item() if counts[c] else None for c in range(10)]
    fd = frechet_distance(*feature_statistics(feats), *reference_statistics(data_dir, classifier_path))
    return {"n": len(images), "counts": counts, "accuracy": correct.mean().item(),
            "per_class_accuracy": per_class, "fd": fd, "floor": real_floor(counts, data_dir, classifier_path),
            "classifier": {"path": os.path.abspath(classifier_path), "sha256": file_sha256(classifier_path)}}
