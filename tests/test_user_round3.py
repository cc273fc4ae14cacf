"""What a new user still hit in the third round, class by class: outputs that are not regular files, signals
that lose work, a yardstick replaced without a word, outputs that collide or lie about their format, exports
into one folder at once or onto a full disk, resumes onto other data, inputs read wrong, flags that cannot
take effect, notes that say what the file does not, tools that cannot run, and messages that point the wrong
way. Each case fails on the code before the fix."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import export
import infer_trt
import mnist_cnn
import sample
import support
import train

from conftest import MNIST, ROOT
from test_bad_input import one_line_error
from test_evaluate import tiny_ckpt  # noqa: F401  (a fixture: a tiny MNIST-shaped DiT checkpoint)
from test_export import exported_tiny, make_checkpoint
from test_train import TINY, load

SAMPLE = ["--num-samples", "4", "--steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return exported_tiny(tmp_path_factory)


# ----------------------------------------------------------------------------------------------
#                                 Lost work or damaged files
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_device_output_is_written_through_and_a_fifo_refused(tiny, tmp_path, capsys, monkeypatch):
    """--out naming /dev/null (here a private copy of it) must not be renamed over: it stays a device."""
    device = tmp_path / "devnull"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    sample.main(["--ckpt", tiny["ckpt"], *SAMPLE, "--out", str(device)])
    assert stat.S_ISCHR(os.stat(device).st_mode) and sorted(os.listdir(tmp_path)) == ["devnull"]
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    err = one_line_error(capsys, monkeypatch, "sample.py", sample.main,
                         ["--ckpt", tiny["ckpt"], *SAMPLE, "--out", str(fifo)])
    assert f"--out {fifo} exists and is not a regular file" in err and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlinked_output_keeps_its_link(tiny, tmp_path):
    target, link = tmp_path / "real.png", tmp_path / "link.png"
    target.write_bytes(b"old")
    link.symlink_to(target)
    sample.main(["--ckpt", tiny["ckpt"], *SAMPLE, "--out", str(link)])
    assert link.is_symlink() and target.read_bytes().startswith(b"\x89PNG")


def test_a_stopped_evaluation_keeps_the_digits_it_drew(tiny_ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    """SIGTERM (here raised by the model call after two batches) keeps what was drawn, as a failed scoring
    does."""
    real = evaluate.draw_samples

    def stopping(fn, *a, **k):
        calls = []

        def counting(x, t, y):
            calls.append(1)
            if len(calls) > 2 * 3 + 1:               # past 2 batches of 3 steps, and the warm-up call
                raise support.Stopped(signal.SIGTERM)
            return fn(x, t, y)
        return real(counting, *a, **k)
    monkeypatch.setattr(evaluate, "draw_samples", stopping)
    monkeypatch.setattr(evaluate, "KEPT_SAMPLES", str(tmp_path / "kept.npz"))
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    with pytest.raises(SystemExit) as e:
        support.run_cli(lambda: evaluate.main(["score", "--ckpt", tiny_ckpt, "--per-class", "13", "--steps", "3",
                                               "--cfg-scale", "1", "--batch-size", "20"]))
    err = capsys.readouterr().err
    assert e.value.code == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err
    assert f"stopped after 40 of 130 digits; they are kept in {tmp_path / 'kept.npz'}" in err
    with np.load(tmp_path / "kept.npz") as z:
        assert z["images"].shape == (40, 1, 32, 32) and z["labels"].tolist() == [i % 10 for i in range(40)]


def test_a_new_classifier_never_replaces_one_and_scores_name_theirs(tmp_path, monkeypatch, capsys):
    err = one_line_error(capsys, monkeypatch, "evaluate.py", evaluate.main,
                         ["train-classifier", "--out", mnist_cnn.CLASSIFIER_PATH])
    assert "exists; write the new classifier to a new file" in err
    with pytest.raises(SystemExit):
        evaluate.main(["train-classifier"])                  # --out is required: no default file to replace
    images = torch.randint(0, 256, (200, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    r = mnist_cnn.score_images(images, torch.arange(200) % 10, MNIST)
    assert r["classifier"] == {"path": mnist_cnn.CLASSIFIER_PATH,
                               "sha256": support.file_sha256(mnist_cnn.CLASSIFIER_PATH)}


@pytest.mark.parametrize("name,words", [("c1.txt", ".txt is not an image format"),
                                        ("grid", "no suffix is not an image format")])
def test_the_grid_is_written_in_the_format_its_name_says(tiny, tmp_path, capsys, monkeypatch, name, words):
    out = tmp_path / name
    err = one_line_error(capsys, monkeypatch, "sample.py", sample.main,
                         ["--ckpt", tiny["ckpt"], *SAMPLE, "--out", str(out)])
    assert words in err and not out.exists()
    sample.main(["--ckpt", tiny["ckpt"], *SAMPLE, "--out", str(tmp_path / "g.jpg")])
    assert Image.open(tmp_path / "g.jpg").format == "JPEG" and (tmp_path / "g.txt").read_text() == "0 1 2 3\n"


def test_two_exports_into_one_folder_do_not_run_at_once(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "deploy"
    with support.RunLock(str(folder), what="export"):
        err = one_line_error(capsys, monkeypatch, "export.py", export.main,
                             ["--ckpt", tiny["ckpt"], "--out-dir", str(folder), "--verify-steps", "2"])
    assert f"{folder} is in use by another export" in err and "--out-dir" in err
    assert os.listdir(folder) == []


def test_an_export_on_a_full_disk_moves_no_file_without_its_sidecar(tiny, tmp_path, capsys, monkeypatch):
    real, calls = support.write_sidecar, []

    def sidecar_on_a_full_disk(path, meta, name=None):
        calls.append(path)
        if len(calls) == 2:                                  # the fp16 graph's sidecar finds the disk full
            raise support.DiskFull(f"no space left on the disk of {os.path.dirname(path)} while writing "
                                   f"{os.path.basename(path)}.json (left unchanged); free some space")
        return real(path, meta, name)
    monkeypatch.setattr(support, "write_sidecar", sidecar_on_a_full_disk)
    folder = tmp_path / "deploy"
    one_line_error(capsys, monkeypatch, "export.py", export.main,
                   ["--ckpt", tiny["ckpt"], "--out-dir", str(folder), "--verify-steps", "2"])
    assert sorted(os.listdir(folder)) == ["model.onnx", "model.onnx.json"]     # each file with its sidecar


def test_a_full_disk_anywhere_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def onnx_save_on_a_full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "export_onnx", onnx_save_on_a_full_disk)
    err = one_line_error(capsys, monkeypatch, "export.py", export.main,
                         ["--ckpt", tiny["ckpt"], "--out-dir", str(tmp_path / "d"), "--verify-steps", "2"])
    assert "no space left on the disk" in err and "free some space" in err


# ----------------------------------------------------------------------------------------------
#                                    Silent wrong answers
# ----------------------------------------------------------------------------------------------

def test_resume_refuses_other_data_and_names_changed_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "2", "--out", out])
    folder = tmp_path / "images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 200, np.uint8)).save(folder / c / "x.png")
    with pytest.raises(support.UserError, match=r"was trained on mnist with classes \['0', '1', .*not on folder"):
        train.main([*TINY, "--steps", "4", "--out", out, "--resume", "auto", "--dataset", "folder",
                    "--data-dir", str(folder)])
    capsys.readouterr()
    train.main([*TINY, "--steps", "4", "--out", out, "--resume", "auto", "--lr", "5e-4", "--batch-size", "8"])
    said = capsys.readouterr().out
    assert "note: resuming with other settings than the checkpoint's: --batch-size 16 -> 8, --lr 0.001 -> 0.0005" \
        in said and load(out)["step"] == 4
    assert support.resume_command(["--steps", "9"], out, world=2) == \
        f"torchrun --nproc_per_node=2 train.py --steps 9 --resume auto --out {out}"


def test_a_16_bit_png_reads_at_its_brightness_and_aliased_classes_are_refused(tmp_path):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(folder / "a" / "x.png")   # 128 of 255 in 16 bits
    assert Image.open(folder / "a" / "x.png").mode.startswith("I")
    ds = data.load_dataset("folder", str(folder), image_size=8)
    assert ds.images.unique().tolist() == [128]
    for names in (("Cat", "cat"), ("ankle boot", "ankle_boot")):
        other = tmp_path / names[0].replace(" ", "-")
        for name in names:
            (other / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(other / name / "x.png")
        with pytest.raises(data.DataError, match=f"class folders {names[0]!r} and {names[1]!r}"):
            data.load_dataset("folder", str(other), image_size=8)


@pytest.mark.parametrize("script,argv,words", [
    ("sample.py", ["--sampler", "dpm++2m", "--eta", "0.5"], "--eta is DDIM's noise"),
    ("sample.py", ["--labels", "1 2", "--label-order", "random"], "--label-order chooses the labels of"),
    ("sample.py", ["--sampler", "ddim", "--no-lower-order-final"], "--no-lower-order-final is DPM-Solver++(2M)'s"),
    ("sample.py", ["--labels", "1 2", "--cfg-scale", "0"], "--cfg-scale 0 samples unconditionally"),
    ("infer_trt.py", ["--backend", "ort", "--cuda-graph"], "--cuda-graph replays a TensorRT engine"),
])
def test_flags_that_cannot_take_effect_are_one_line(tiny, tmp_path, capsys, monkeypatch, script, argv, words):
    source = ["--ckpt", tiny["ckpt"]] if script == "sample.py" else ["--onnx", os.path.join(tiny["dir"], "model.onnx")]
    main = sample.main if script == "sample.py" else infer_trt.main
    assert words in one_line_error(capsys, monkeypatch, script, main,
                                   [*source, *argv, "--out", str(tmp_path / "g.png")])


def test_unconditional_samples_say_so(tiny, tmp_path, capsys):
    sample.main(["--ckpt", tiny["ckpt"], *SAMPLE, "--cfg-scale", "0", "--out", str(tmp_path / "g.png")])
    assert "note: --cfg-scale 0 samples unconditionally" in capsys.readouterr().err
    assert (tmp_path / "g.txt").read_text() == "unconditional unconditional unconditional unconditional\n"


def test_evaluate_onnx_without_its_backend_is_one_line(tiny, capsys, monkeypatch):
    err = one_line_error(capsys, monkeypatch, "evaluate.py", evaluate.main,
                         ["score", "--ckpt", tiny["ckpt"], "--onnx", os.path.join(tiny["dir"], "model.onnx")])
    assert "--onnx is run by --backend ort" in err


def test_the_shipped_model_note_says_what_the_file_records(tmp_path, monkeypatch, capsys):
    other = make_checkpoint(tmp_path / "other.pt")
    monkeypatch.setattr(support, "SHIPPED_CKPT", other)
    assert support.checkpoint_or_shipped(None) == other
    assert "(a DiT of width 32 and depth 2 trained on unknown data, step 7)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
#                             Tools that run, progress, messages
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py")))
def test_every_tool_answers_from_any_folder_or_says_it_is_a_module(tool, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    assert (r.returncode == 0 and "usage:" in r.stdout) or \
        (r.returncode == 1 and r.stderr.strip().endswith("not a script; run python tools/" + r.stderr.split("run python tools/")[-1].strip()))


def test_a_long_single_batch_shows_its_progress_per_sampling_step(tiny, tmp_path, capsys):
    sample.main(["--ckpt", tiny["ckpt"], "--num-samples", "2", "--sampler", "ddpm", "--steps", "120",
                 "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert "sampling step 1/120" in err and "sampling step 120/120 (100%)" in err


def test_messages_point_the_right_way(tiny, tmp_path, capsys, monkeypatch):
    onnx = os.path.join(tiny["dir"], "model.onnx")
    for argv, words in ((["--onnx", tiny["dir"]], "is a folder, not a file"),
                        (["--onnx", tiny["ckpt"]], "is a PyTorch checkpoint, not an exported file"),
                        (["--engine", onnx], "is an ONNX file; pass it as --onnx")):
        assert words in one_line_error(capsys, monkeypatch, "infer_trt.py", infer_trt.main,
                                       [*argv, "--out", str(tmp_path / "g.png")])
    # The checkpoint an export came from, changed in place: said as such, not "from X, not from X".
    folder = tmp_path / "moved"
    shutil.copytree(tiny["dir"], folder)
    ckpt = str(folder / "ckpt.pt")
    export.main(["--ckpt", ckpt, "--verify-steps", "2", "--max-batch", "8", "--batch-size", "4"])
    make_checkpoint(ckpt, seed=5)
    err = one_line_error(capsys, monkeypatch, "infer_trt.py", infer_trt.main,
                         ["--onnx", str(folder / "model.onnx"), "--ckpt", ckpt, "--out", str(tmp_path / "g.png")])
    assert f"{ckpt} changed since" in err and "was exported from it" in err
    # A sampling-only checkpoint given to ship_checkpoint.py, and a read-only output folder.
    import ship_checkpoint
    err = one_line_error(capsys, monkeypatch, "ship_checkpoint.py", ship_checkpoint.main,
                         [support.SHIPPED_CKPT, "--out", str(tmp_path / "s.pt"), "--command", "c", "--commit", "x"])
    assert "is already a sampling-only checkpoint" in err
    if os.geteuid() != 0:                                    # root writes through any mode bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = one_line_error(capsys, monkeypatch, "sample.py", sample.main,
                             ["--ckpt", tiny["ckpt"], *SAMPLE, "--out", str(locked / "g.png")])
        assert "choose a writable --out" in err


def test_infer_trt_from_another_folder_says_why_it_samples_with_pytorch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(infer_trt, "trt_unavailable_reason", lambda: "TensorRT is not installed")
    args = infer_trt.parse_args([])
    assert infer_trt.choose_backend(args)[0] == "torch"
    assert "note: no runs/shipped/model.onnx in " in capsys.readouterr().err


@pytest.mark.parametrize("load,env,expected", [
    (3.0, {}, ("PASSIVE", None, True)),                       # busy: threads wait passively, and a note says so
    (0.1, {}, (None, "10000", False)),                        # quiet: a bounded spin
    (3.0, {"GOMP_SPINCOUNT": "500"}, (None, "500", False)),   # the environment's choice wins
])
def test_openmp_waits_passively_on_a_busy_machine_unless_told(load, env, expected):
    code = (f"import os; os.getloadavg = lambda: ({load}, {load}, {load}); import support; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), bool(support.OPENMP_NOTE))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True)
    assert r.stdout.split() == [str(v) for v in expected], r.stderr


def test_nohup_keeps_sighup_ignored_and_a_hangup_saves_quietly(monkeypatch):
    """Under nohup SIGHUP stays ignored; otherwise StopFlag takes it, and a repeated SIGHUP changes nothing."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        flag = support.StopFlag()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        flag.restore()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        flag = support.StopFlag()
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGHUP)              # the shell's hangup, then again as it exits
        assert flag.signum == signal.SIGHUP and signal.getsignal(signal.SIGHUP) == flag.handle
        flag.restore()
    finally:
        signal.signal(signal.SIGHUP, before)


def test_the_openmp_note_never_joins_a_flag_error(monkeypatch, capsys):
    monkeypatch.setattr(support, "OPENMP_NOTE", "note: this CPU is busy")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--bogus"])
    with pytest.raises(SystemExit):
        support.run_cli(lambda: sample.parse_args(["--bogus"]))
    assert capsys.readouterr().err == "sample.py: error: unrecognized arguments: --bogus\n"
    support.run_cli(lambda: None)
    assert capsys.readouterr().err == "note: this CPU is busy\n" and support.OPENMP_NOTE is None


def test_too_few_digits_for_an_fd_are_refused_before_sampling(tiny_ckpt, capsys, monkeypatch):  # noqa: F811
    for argv in (["score", "--per-class", "12"], ["table", "--rows", "ddim-10:12", "--per-class", "13"]):
        err = one_line_error(capsys, monkeypatch, "evaluate.py", evaluate.main, [*argv, "--ckpt", tiny_ckpt])
        assert "120 digits cannot give a Frechet distance in 128 features" in err


def test_links_and_other_files_are_checked_where_the_output_goes(tmp_path, capsys, monkeypatch):
    link = tmp_path / "g.png"
    link.symlink_to("/proc/g.png")
    with pytest.raises(support.UserError, match="cannot write to /proc"):
        support.check_writable(str(link), "--out")
    os.mkfifo(tmp_path / "model.onnx")
    err = one_line_error(capsys, monkeypatch, "infer_trt.py", infer_trt.main,
                         ["--onnx", str(tmp_path / "model.onnx"), "--out", str(tmp_path / "x.png")])
    assert "is not a regular file" in err
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "model.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(support.UserError, match="model.onnx exists and is not a regular file"):
        support.place_with_sidecar(str(tmp_path / "a"), str(tmp_path / "deploy" / "model.onnx"), {})
