"""evaluate.py: the committed classifier, the Frechet distance, the accuracy score and the CLI end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import mnist_cnn
from support import UserError
from support import config_dict, save_checkpoint
from diffusion import DiffusionConfig
from dit import DiT, DiTConfig

from conftest import MNIST as DATA, ROOT


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def test_digits():
    from data import load_dataset
    test = load_dataset("mnist", data_dir=DATA, split="test", download=False)
    # 200 per class (a 2,000-digit subset keeps this fast), balanced so relabelling keeps the counts.
    # Random within each class: MNIST's first 5,000 test digits are the neater writers'.
    g = torch.Generator().manual_seed(0)
    pools = [(test.labels == c).nonzero().flatten() for c in range(10)]
    idx = torch.cat([p[torch.randperm(len(p), generator=g)[:200]] for p in pools])
    return test.images[idx], test.labels[idx]


# ---------------------------------------------------------------------------------------- the classifier

def test_committed_classifier_is_small_and_documented():
    size = os.path.getsize(mnist_cnn.CLASSIFIER_PATH)
    assert size < 1_000_000
    model, blob = mnist_cnn.load_classifier()
    assert blob["test_accuracy"] >= 0.993
    assert "evaluate.py train-classifier" in blob["command"] and isinstance(blob["seed"], int)


def test_classifier_scores_real_test_digits(test_digits):
    images, labels = test_digits
    logits, feats = mnist_cnn.classify(mnist_cnn.load_classifier()[0], images)
    assert (logits.argmax(1) == labels).double().mean().item() >= 0.99
    assert feats.shape == (2000, 128) and feats.dtype == torch.float64


def test_random_shift_moves_digits_without_losing_them():
    x = torch.full((50, 1, 32, 32), -1.0)
    x[:, :, 10:20, 12:18] = 1.0                                          # a block inside the 2-px margin
    y = mnist_cnn.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal((y > 0).sum((1, 2, 3)), (x > 0).sum((1, 2, 3)))  # nothing cut off
    assert not torch.equal(x, y)


# ---------------------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert mnist_cnn.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_eigenvalues_of_the_product_for_full_covariances():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    # tr((S1 S2)^(1/2)) = sum of square roots of the (real, positive) eigenvalues of S1 S2.
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert mnist_cnn.frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(expected, rel=1e-8)
    root = mnist_cnn.sqrtm_psd(s1)
    assert np.allclose(root @ root, s1)


def test_fd_of_a_set_with_itself_is_zero_and_of_noise_is_large(test_digits):
    images, _ = test_digits
    model = mnist_cnn.load_classifier()[0]
    stats = mnist_cnn.feature_statistics(mnist_cnn.classify(model, images[0::2])[1])
    assert abs(mnist_cnn.frechet_distance(*stats, *stats)) < 1e-7 * np.trace(stats[1])   # round-off only
    other = mnist_cnn.feature_statistics(mnist_cnn.classify(model, images[1::2])[1])
    real_vs_real = mnist_cnn.frechet_distance(*stats, *other)
    noise = torch.randint(0, 256, (1000, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noise_fd = mnist_cnn.frechet_distance(*stats, *mnist_cnn.feature_statistics(mnist_cnn.classify(model, noise)[1]))
    assert noise_fd > 20 * real_vs_real


# ---------------------------------------------------------------------------------------- accuracy

def test_accuracy_of_correct_and_mislabelled_real_digits(test_digits):
    images, labels = test_digits
    right = mnist_cnn.score_images(images, labels, DATA)
    assert right["accuracy"] >= 0.99 and min(right["per_class_accuracy"]) >= 0.95
    wrong = mnist_cnn.score_images(images, (labels + 1) % 10, DATA)
    assert wrong["accuracy"] <= 0.01
    half = labels.clone()
    half[torch.arange(2000) % 200 < 100] += 1                            # the first 100 of each class ...
    half %= 10                                                           # ... labelled as the next class
    assert mnist_cnn.score_images(images, half, DATA)["accuracy"] == pytest.approx(0.5, abs=0.01)
    assert wrong["fd"] == pytest.approx(right["fd"])                     # FD ignores labels ...
    assert right["fd"] < 2 * right["floor"]                              # ... and real test digits sit at the floor
    assert wrong["counts"] == right["counts"] == [200] * 10


# ---------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    mc = DiTConfig(hidden_size=32, depth=1, num_heads=2, patch_size=8)
    dc = DiffusionConfig(num_timesteps=50, prediction="x0")
    model = DiT(mc)
    with torch.no_grad():                                                # adaLN-Zero starts at output 0:
        for p in model.parameters():                                     # perturb so samples vary
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint(path, {"model_config": config_dict(mc), "diffusion_config": config_dict(dc),
                           "model": model.state_dict(), "ema": model.state_dict(),
                           "class_names": [str(i) for i in range(10)], "step": 0, "dataset": "mnist"})
    return str(path)


def run_main(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
    evaluate.main()
    return capsys.readouterr().out


def test_score_end_to_end_on_a_tiny_checkpoint_and_its_npz(tiny_ckpt, tmp_path, monkeypatch, capsys):
    npz, js = tmp_path / "s.npz", tmp_path / "s.json"
    out = run_main(monkeypatch, capsys, "score", "--ckpt", tiny_ckpt, "--per-class", "13", "--steps", "3",
                   "--cfg-scale", "2", "--data-dir", DATA, "--save-npz", str(npz), "--out-json", str(js))
    assert "FD (MNIST-CNN)" in out and "floor (130 real training digits)" in out
    r = json.loads(js.read_text())
    assert r["n"] == 130 and r["counts"] == [13] * 10 and r["nfe_per_image"] == 6 and r["fd"] > r["floor"]
    assert r["accuracy"] < 0.5                                           # random weights draw no digits
    with np.load(npz) as z:
        assert z["images"].shape == (130, 1, 32, 32) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [i % 10 for i in range(130)]
    again = mnist_cnn.score_images(*evaluate.load_npz(npz), DATA)         # the saved digits score the same
    assert again["fd"] == pytest.approx(r["fd"]) and again["accuracy"] == r["accuracy"]
    out = run_main(monkeypatch, capsys, "score", "--npz", str(npz), "--data-dir", DATA)
    assert f"{r['fd']:.2f}" in out


def test_table_end_to_end_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, monkeypatch, capsys):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    run_main(monkeypatch, capsys, "table", "--ckpt", tiny_ckpt, "--per-class", "13", "--rows", "ddim-2,ddim-3,dpm++2m-3:14",
             "--cfg-scales", "3", "--sweep-at", "ddim-2", "--data-dir", DATA, "--out-md", str(md), "--out-json", str(js))
    report = json.loads(js.read_text())
    assert [r["cfg_scale"] for r in report["sweep"]] == [1.0, 3.0]
    scales = sorted({1.0, report["best_cfg_scale"]})                    # each row at CFG 1 and the best scale
    assert [(r["steps"], r["n"], r["cfg_scale"]) for r in report["rows"]] == \
        [(2, 130, s) for s in scales] + [(3, 130, s) for s in scales] + [(3, 140, s) for s in scales]
    assert report["recommended"]["sampler"] == "ddim"                  # chosen among the rows of the common N
    assert "FD (MNIST-CNN)" in md.read_text() and "(chosen)" in md.read_text()
    out = run_main(monkeypatch, capsys, "table", "--ckpt", tiny_ckpt, "--per-class", "13", "--rows", "ddim-2,ddim-3",
                   "--cfg-scales", "3", "--sweep-at", "ddim-2", "--data-dir", DATA, "--out-json", str(js), "--resume")
    assert f"reusing {2 + len(report['rows'])} results" in out                # an interrupted table goes on
    again = json.loads(js.read_text())
    assert again["sweep"] == report["sweep"] and again["rows"] == report["rows"][:2 * len(scales)]


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="bad sampler setting"):
        evaluate.parse_setting("euler-10")
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((2, 32, 32)))
    with pytest.raises(UserError, match="'images'"):
        evaluate.load_npz(bad)
    with pytest.raises(UserError, match="uint8 \\(N, 1, 32, 32\\)"):
        mnist_cnn.score_images(torch.zeros((4, 1, 28, 28), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "score", "--ckpt", str(tmp_path / "no.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_scored_digits_are_the_ones_sample_py_draws(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Default setting and seed of both: evaluate.py's first digits are sample.py's default grid, pixel for pixel."""
    from PIL import Image
    from sample import image_grid
    npz, png = tmp_path / "e.npz", tmp_path / "s.png"
    run_main(monkeypatch, capsys, "score", "--ckpt", tiny_ckpt, "--per-class", "13", "--data-dir", DATA,
             "--save-npz", str(npz))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", tiny_ckpt, "--num-samples", "130",
                        "--out", str(png)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with np.load(npz) as z:
        ours = np.array(image_grid(torch.from_numpy(z["images"]).float() / 127.5 - 1, nrow=8))
    assert np.array_equal(ours, np.array(Image.open(png)))


def test_scores_refuse_inputs_they_would_read_wrong(tmp_path, capsys):
    """Floats outside [-1, 1], RGB images and too few images for an FD in 128 features are one-line errors,
    and an FD from fewer than 1,000 images carries a warning."""
    for low, high in ((0.0, 1.0), (0.0, 255.0)):
        path = tmp_path / f"f{high:g}.npz"
        np.savez(path, images=np.linspace(low, high, 10 * 32 * 32, dtype=np.float32).reshape(10, 1, 32, 32),
                 labels=np.arange(10))
        with pytest.raises(UserError, match=r"float images must be in \[-1, 1\] .* span \[0, " + f"{high:g}"):
            evaluate.load_npz(path)
    with pytest.raises(UserError, match=r"\(4, 3, 32, 32\): the classifier reads 1-channel digits, not RGB"):
        mnist_cnn.score_images(torch.zeros((4, 3, 32, 32), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="10 images cannot give a Frechet distance in 128 features"):
        mnist_cnn.score_images(torch.zeros((10, 1, 32, 32), dtype=torch.uint8), torch.arange(10), DATA)
    images = torch.randint(0, 256, (200, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mnist_cnn.score_images(images, torch.arange(200) % 10, DATA)
    assert "warning: an FD from 200 images" in capsys.readouterr().err
