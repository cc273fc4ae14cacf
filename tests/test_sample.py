"""sample.py end to end on a tiny checkpoint written here: grid and label table, label parsing, seeds, errors."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import support
import sample
from diffusion import DiffusionConfig
from dit import DiT, DiTConfig

CELL = 32 + 2          # image size + grid padding (sample.image_grid)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny DiT with random (non-zero) weights, saved in train.py's checkpoint format."""
    torch.manual_seed(0)
    config = DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=4, num_classes=10)
    model = DiT(config)
    with torch.no_grad():                          # adaLN-Zero starts at an exact 0 output: perturb it
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    support.save_checkpoint(path, {
        "model_config": support.config_dict(config),
        "diffusion_config": support.config_dict(DiffusionConfig(prediction="x0")),
        "model": model.state_dict(), "ema": model.state_dict(), "step": 7,
        "class_names": [str(i) for i in range(10)], "dataset": "mnist"})
    return str(path)


def run(ckpt, tmp_path, *extra, name="grid.png"):
    out = tmp_path / name
    sample.main(["--ckpt", ckpt, "--steps", "3", "--device", "cpu", "--out", str(out), *extra])
    return out


def test_labels_grid_and_table(ckpt, tmp_path):
    out = run(ckpt, tmp_path, "--labels", "2 4 one nine")
    assert Image.open(out).size == (4 * CELL + 2, CELL + 2)
    assert (tmp_path / "grid.txt").read_text() == "2 4 1 9\n"


def test_num_samples_rows(ckpt, tmp_path):
    out = run(ckpt, tmp_path, "--num-samples", "10", "--nrow", "4", "--sampler", "dpm++2m")
    assert Image.open(out).size == (4 * CELL + 2, 3 * CELL + 2)
    assert (tmp_path / "grid.txt").read_text() == "0 1 2 3\n4 5 6 7\n8 9\n"
    run(ckpt, tmp_path, "--num-samples", "16", "--label-order", "random", name="r.png")
    names = (tmp_path / "r.txt").read_text().split()
    assert len(names) == 16 and len(set(names)) > 3 and names != [str(i % 10) for i in range(16)]


def test_same_seed_same_png_and_batching_does_not_matter(ckpt, tmp_path):
    a = run(ckpt, tmp_path, "--labels", "1 2 3 4 5", "--seed", "3", name="a.png").read_bytes()
    b = run(ckpt, tmp_path, "--labels", "1 2 3 4 5", "--seed", "3", name="b.png").read_bytes()
    c = run(ckpt, tmp_path, "--labels", "1 2 3 4 5", "--seed", "4", name="c.png").read_bytes()
    d = run(ckpt, tmp_path, "--labels", "1 2 3 4 5", "--seed", "3", "--batch-size", "2", name="d.png")
    assert a == b and a != c
    diff = np.asarray(Image.open(d), dtype=int) - np.asarray(Image.open(tmp_path / "a.png"), dtype=int)
    assert np.abs(diff).max() <= 1          # same noise per image whatever the batch (float rounding aside)


def test_ddpm_cfg_thresholding_no_ema_run(ckpt, tmp_path):
    out = run(ckpt, tmp_path, "--labels", "0 1", "--sampler", "ddpm", "--cfg-scale", "3", "--thresholding",
              "--no-ema")
    assert Image.open(out).size == (2 * CELL + 2, CELL + 2)


@pytest.mark.parametrize("extra, message", [
    (["--labels", "2 twelve"], "unknown label 'twelve'"),
    (["--labels", "3 10"], "label 10 is out of range"),
    (["--num-samples", "0"], "argument --num-samples: must be an integer > 0, got 0"),
    (["--steps", "0"], "argument --steps: must be an integer > 0, got 0"),
    (["--labels", "1", "--num-samples", "3"], "either --labels or --num-samples"),
])
def test_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys, monkeypatch, extra, message):
    argv = ["--ckpt", ckpt, "--out", str(tmp_path / "g.png"), "--steps", "2", *extra]
    check_one_line_error(capsys, monkeypatch, argv, message)
    assert not (tmp_path / "g.png").exists()


def test_not_a_checkpoint_and_unwritable_out(ckpt, tmp_path, capsys, monkeypatch):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a checkpoint at all")
    check_one_line_error(capsys, monkeypatch, ["--ckpt", str(fake), "--out", str(tmp_path / "g.png")], str(fake))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    check_one_line_error(capsys, monkeypatch, ["--ckpt", str(tmp_path / "other.pt")], "not a DiT checkpoint")
    check_one_line_error(capsys, monkeypatch, ["--ckpt", str(tmp_path / "missing.pt")], "does not exist")
    # A missing output folder is created; a path through a file cannot be.
    (tmp_path / "a_file").write_text("x")
    check_one_line_error(capsys, monkeypatch, ["--ckpt", ckpt, "--out", str(tmp_path / "a_file" / "g.png")],
                         "cannot write")


def check_one_line_error(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        support.run_cli(sample.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sample.py: error:") and message in err, err


def test_bf16_precision_draws_the_fp32_digits_within_tolerance(ckpt, tmp_path):
    a = np.asarray(Image.open(run(ckpt, tmp_path, "--labels", "1 2 3 4", name="fp32.png")), dtype=int)
    b = np.asarray(Image.open(run(ckpt, tmp_path, "--labels", "1 2 3 4", "--precision", "bf16", name="bf16.png")),
                   dtype=int)
    assert np.abs(a - b).mean() <= 2 and not np.array_equal(a, b)   # close, and bf16 really ran
