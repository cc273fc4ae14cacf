"""The promise "bad input is one line `script: error: ...`, exit 2, and no work is lost", class by class:
an output never overwrites an input, checks come before the work, a name is matched as a name, no traceback
(Ctrl-C, out of memory, a folder as --out), no leftovers, and the words a new user reads."""
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import support
import data
import export
import infer_trt
import sample
import ship_checkpoint
import train
import bench
import evaluate

from conftest import MNIST
from test_bad_input import one_line_error
from test_evaluate import tiny_ckpt  # noqa: F401  (a fixture: a tiny MNIST-shaped DiT checkpoint)
from test_export import exported_tiny, make_checkpoint
from test_train import TINY

SCRIPTS = {"sample.py": sample.main, "infer_trt.py": infer_trt.main, "export.py": export.main,
           "evaluate.py": evaluate.main, "bench.py": bench.main, "ship_checkpoint.py": ship_checkpoint.main,
           "train.py": train.main}


def fails(capsys, monkeypatch, script, argv, *words):
    """script's main, run as a user runs it, must end with one line naming every word."""
    err = one_line_error(capsys, monkeypatch, script, SCRIPTS[script], argv)
    for word in words:
        assert word in err, err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return exported_tiny(tmp_path_factory)


def spell(path, how, tmp_path):
    """Another spelling of an existing file's path: as is, relative through .., a symlink, a hard link."""
    path = os.path.abspath(path)
    if how == "same":
        return path
    if how == "dotdot":
        return os.path.relpath(os.path.join(os.path.dirname(path), "..", os.path.basename(os.path.dirname(path)),
                                            os.path.basename(path)))
    link = str(tmp_path / f"{how}-{os.path.basename(path)}")
    (os.symlink if how == "symlink" else os.link)(path, link)
    return link


def digest(path):
    with open(path, "rb") as f:
        return hash(f.read())


# ---------------------------------------------------------------- 1. an output is never one of the inputs

SPELLINGS = ["same", "dotdot", "symlink", "hardlink"]


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("case", ["sample --out = --ckpt", "evaluate --out-json = --ckpt", "bench --json = --ckpt",
                                  "ship --out = ckpt", "infer_trt --out = --onnx", "infer_trt --out = sidecar",
                                  "export --out-dir holds --ckpt"])
def test_no_script_writes_over_one_of_its_inputs(case, how, tiny, tmp_path, capsys, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    onnx = os.path.join(tiny["dir"], "model.onnx")
    victim, script, argv = {
        "sample --out = --ckpt": (ckpt, "sample.py", lambda v: ["--ckpt", ckpt, "--out", v]),
        "evaluate --out-json = --ckpt": (ckpt, "evaluate.py", lambda v: ["score", "--ckpt", ckpt, "--out-json", v]),
        "bench --json = --ckpt": (ckpt, "bench.py", lambda v: ["--ckpt", ckpt, "--json", v]),
        "ship --out = ckpt": (ckpt, "ship_checkpoint.py", lambda v: [ckpt, "--out", v, "--command", "c", "--commit", "x"]),
        "infer_trt --out = --onnx": (onnx, "infer_trt.py", lambda v: ["--onnx", onnx, "--out", v]),
        "infer_trt --out = sidecar": (onnx + ".json", "infer_trt.py", lambda v: ["--onnx", onnx, "--out", v]),
        "export --out-dir holds --ckpt": (None, "export.py", None)}[case]
    if script == "export.py":                      # a checkpoint named like one of export.py's outputs
        victim = str(tmp_path / "model.onnx")
        shutil.copy(ckpt, victim)
        argv = lambda v: ["--ckpt", v, "--out-dir", str(tmp_path)]          # noqa: E731
    before = digest(victim)
    if script == "evaluate.py":
        monkeypatch.setattr(evaluate, "draw_samples", lambda *a, **k: pytest.fail("sampled before the check"))
    fails(capsys, monkeypatch, script, argv(spell(victim, how, tmp_path)), "would overwrite")
    assert digest(victim) == before


def test_training_output_inside_the_data_is_refused(tmp_path, capsys, monkeypatch):
    from PIL import Image
    for c in ("a", "b"):
        os.makedirs(tmp_path / "data" / c)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / c / "x.png")
    fails(capsys, monkeypatch, "train.py", [*TINY[2:], "--dataset", "folder", "--data-dir", str(tmp_path / "data"),
                                            "--out", str(tmp_path / "data" / "run")], "inside --data-dir")
    assert sorted(os.listdir(tmp_path / "data")) == ["a", "b"]


# ---------------------------------------------------------------- 2. checks before the work, and work kept

def test_evaluate_checks_data_classifier_and_flags_before_sampling(tiny_ckpt, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(evaluate, "draw_samples", lambda *a, **k: pytest.fail("sampled before the check"))
    fails(capsys, monkeypatch, "evaluate.py", ["score", "--ckpt", tiny_ckpt, "--data-dir", str(tmp_path)],
          "t10k-images-idx3-ubyte")                                  # no MNIST test digits there
    fails(capsys, monkeypatch, "evaluate.py", ["score", "--ckpt", tiny_ckpt, "--classifier", tiny_ckpt],
          "not an MNIST classifier")
    fails(capsys, monkeypatch, "evaluate.py", ["table", "--ckpt", tiny_ckpt, "--resume"], "--out-json")
    fails(capsys, monkeypatch, "evaluate.py", ["score", "--ckpt", tiny_ckpt, "--out-json", str(tmp_path)], "is a folder")


def test_evaluate_keeps_the_samples_when_scoring_fails(tiny_ckpt, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)

    def broken(*a, **k):
        raise support.UserError("the scoring broke")
    monkeypatch.setattr(evaluate, "score_images", broken)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "score", "--ckpt", tiny_ckpt, "--per-class", "13"])
    with pytest.raises(SystemExit) as e:
        support.run_cli(evaluate.main)
    err = capsys.readouterr().err.splitlines()[-1]              # after the progress lines
    assert e.value.code == 2 and err.startswith("evaluate.py: error: the scoring broke") and "--npz" in err, err
    with np.load(tmp_path / "runs" / "evaluate-samples.npz") as z:
        assert z["images"].shape == (130, 1, 32, 32) and list(z["labels"][:3]) == [0, 1, 2]
    assert "evaluate-samples.npz" in err


def test_bench_checks_json_and_that_onnx_is_the_checkpoints_before_measuring(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench.speedups, "measure_matmul_peak", lambda *a, **k: pytest.fail("measured first"))
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    onnx = os.path.join(tiny["dir"], "model.onnx")
    fails(capsys, monkeypatch, "bench.py", ["--ckpt", other, "--onnx", onnx], "was exported from checkpoint")
    (tmp_path / "file").write_text("x")
    fails(capsys, monkeypatch, "bench.py", ["--ckpt", tiny["ckpt"], "--json", str(tmp_path / "file" / "b.json")],
          "cannot write")


def test_infer_trt_compare_finds_its_checkpoint_before_sampling(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "export"
    shutil.copytree(tiny["dir"], folder)
    meta = support.load_sidecar(folder / "model.onnx")          # the checkpoint the sidecar names is gone:
    meta["checkpoint"]["path"] = str(tmp_path / "gone" / "ckpt.pt")
    support.write_sidecar(folder / "model.onnx", {k: v for k, v in meta.items() if k not in (
        "format", "version", "artifact", "artifact_sha256", "sidecar_sha256")})
    monkeypatch.setattr(sample, "draw_samples", lambda *a, **k: pytest.fail("sampled before the check"))
    fails(capsys, monkeypatch, "infer_trt.py", ["--onnx", str(folder / "model.onnx"), "--compare", "--out",
                                                str(tmp_path / "g.png")], "--compare needs the checkpoint")


# ---------------------------------------------------------------- 3. names are names; no flag without effect

def test_a_class_named_like_a_number_is_found_by_name():
    names = ["1", "3", "7"]
    assert sample.parse_labels("1 7 3", names) == [0, 2, 1]
    assert sample.parse_labels("2", names) == [2]                       # not a name: then an index
    with pytest.raises(support.UserError, match="out of range"):
        sample.parse_labels("9", names)


def test_two_word_class_names_are_typed_with_underscores():
    names = ["T-shirt/top", "Ankle boot"]
    assert sample.parse_labels("ankle_boot t-shirt/top", names) == [1, 0]
    with pytest.raises(support.UserError, match="'ankle_boot'"):
        sample.parse_labels("boot", names)


def test_an_empty_class_folder_is_refused(tmp_path):
    for c in ("a", "b", "c"):
        os.makedirs(tmp_path / c)
    from PIL import Image
    for c in ("a", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    with pytest.raises(data.DataError, match="b holds no images"):
        data.load_dataset("folder", str(tmp_path), image_size=8)


# ---------------------------------------------------------------- 4. no traceback

@pytest.mark.parametrize("script", ["sample.py", "evaluate.py", "export.py", "train.py"])
def test_ctrl_c_anywhere_is_one_line_and_exit_130(script, tiny_ckpt, tmp_path, capsys, monkeypatch):  # noqa: F811
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    target, argv = {"sample.py": (sample, ["--ckpt", tiny_ckpt, "--out", str(tmp_path / "g.png")]),
                    "evaluate.py": (evaluate, ["score", "--ckpt", tiny_ckpt, "--per-class", "13"]),
                    "export.py": (export, ["--ckpt", tiny_ckpt, "--out-dir", str(tmp_path)]),
                    "train.py": (train, [*TINY, "--steps", "2", "--out", str(tmp_path / "run")])}[script]
    name = {"train.py": "make_configs", "export.py": "export_onnx"}.get(script, "draw_samples")
    monkeypatch.setattr(target, name, interrupt)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        support.run_cli(lambda: SCRIPTS[script](argv))
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.count("\n") == 1 and "interrupted (Ctrl-C)" in err, err
    assert not os.path.exists(tmp_path / "run") and not [f for f in os.listdir(tmp_path) if f.startswith(".export")]


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                                                "tried to allocate 4000000000000 bytes")])
def test_out_of_memory_is_one_line_naming_the_flag(error, tiny_ckpt, tmp_path, capsys, monkeypatch):  # noqa: F811
    def exhausted(*a, **k):
        raise error
    monkeypatch.setattr(sample, "draw_samples", exhausted)
    monkeypatch.setattr(sys, "argv", ["sample.py"])
    with pytest.raises(SystemExit) as e:
        support.run_cli(lambda: sample.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "g.png")]),
                    memory_hint="lower --batch-size or --num-samples")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "out of memory" in err and "--num-samples" in err, err


def test_out_naming_a_folder_is_refused_before_sampling(tiny_ckpt, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sample, "draw_samples", lambda *a, **k: pytest.fail("sampled before the check"))
    fails(capsys, monkeypatch, "sample.py", ["--ckpt", tiny_ckpt, "--out", str(tmp_path)], "is a folder")


# ---------------------------------------------------------------- 5. leftovers and misleading words

def test_export_removes_the_temp_folders_of_killed_exports(tiny, tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    dead = [tmp_path / ".export-999999999-abc", tmp_path / ".export-old"]    # a gone pid; the old, pid-less name
    alive = tmp_path / f".export-{os.getpid()}-mine"
    for d in (*dead, alive):
        d.mkdir()

    def stop(*a, **k):
        raise support.UserError("stopped after the clean-up")
    monkeypatch.setattr(export, "export_onnx", stop)
    with pytest.raises(support.UserError):
        export.main(["--ckpt", ckpt])
    assert not any(d.exists() for d in dead) and alive.exists()


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / "empty" / "a")
    fails(capsys, monkeypatch, "train.py", [*TINY[2:], "--dataset", "folder", "--data-dir", str(tmp_path / "empty"),
                                            "--out", str(tmp_path / "run")], "no images")
    assert not os.path.exists(tmp_path / "run")


def test_data_dir_naming_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(data.DataError, match="is a file, not a folder"):
        data.load_dataset("mnist", str(tmp_path / "f"))


def test_a_stray_onnx_data_file_is_blamed_not_the_graph(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "export"
    shutil.copytree(tiny["dir"], folder)
    (folder / "model.onnx.data").write_bytes(b"junk")
    fails(capsys, monkeypatch, "infer_trt.py", ["--onnx", str(folder / "model.onnx"), "--out", str(tmp_path / "g.png")],
          "model.onnx.data does not belong to", "delete")


def test_an_engine_without_tensorrt_says_tensorrt_is_absent(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer_trt, "trt_unavailable_reason", lambda: "TensorRT is not installed")
    engine = tmp_path / "model_fp16.engine"
    engine.write_bytes(b"engine")
    fails(capsys, monkeypatch, "infer_trt.py", ["--engine", str(engine), "--out", str(tmp_path / "g.png")],
          f"--engine {engine} needs TensorRT, and TensorRT is not installed")


# ---------------------------------------------------------------- the newcomer's first impression

def test_progress_shows_the_time_budget_as_the_bound(capsys):
    p = support.Progress(30_000, "step ", time_limit=1800, file=sys.stdout, budget="--max-minutes 30")
    p.update(1, force=True)
    p.first = (p.first[0] - 10, 1)                    # 18 steps in 10 s: 30,000 steps would take 4.6 hours
    p.update(19, force=True)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("step 19 (0% of --max-minutes 30)") and "/30000" not in line, line


def test_training_grids_have_one_row_per_class(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "2", "--out", out])
    from PIL import Image
    grid = Image.open(os.path.join(out, "samples", "step_0000002.png"))
    assert grid.size == (8 * 34 + 2, 10 * 34 + 2)                   # 10 MNIST classes, 8 digits each


@pytest.mark.parametrize("script", ["train.py", "sample.py", "export.py", "infer_trt.py"])
def test_help_names_each_default_once(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    parse = {"train.py": train.parse_args, "sample.py": sample.parse_args, "export.py": export.parse_args,
             "infer_trt.py": infer_trt.parse_args}[script]
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: ())" not in text, text


def test_bench_summary_names_the_fastest_row_only_when_it_is_another():
    row = {"backend": "eager", "seconds_per_step": {"median": 0.01, "min": 0.01, "max": 0.01}, "images_per_s": 100,
           "peak_fraction": 0.1, "peak_memory_bytes": 0, "largest_batch": None, "changes_numerics": False}
    assert bench.training_summary([row], "DiT-T/4", "cpu", 128).count("eager") == 1
    faster = {**row, "backend": "compile", "images_per_s": 150, "seconds_per_step": {"median": 0.005}}
    assert ", compile 0.04 h" in bench.training_summary([row, faster], "DiT-T/4", "cpu", 128)


def test_compare_on_an_untrained_model_warns_that_it_shows_nothing(tmp_path, capsys):
    from dit import DiT, DiTConfig
    from diffusion import DiffusionConfig
    config = DiTConfig(image_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2)
    ckpt = str(tmp_path / "fresh.pt")                      # adaLN-Zero: a new DiT outputs exactly 0
    support.save_checkpoint(ckpt, {"model_config": support.config_dict(config), "model": DiT(config).state_dict(),
                               "diffusion_config": support.config_dict(DiffusionConfig(prediction="x0")), "step": 0})
    infer_trt.main(["--ckpt", ckpt, "--backend", "torch", "--compare", "--num-samples", "2",
                    "--out", str(tmp_path / "g.png")])
    out, err = capsys.readouterr()
    assert "tolerance 1 / 255: PASS" in out and "an untrained model, so this comparison shows nothing" in err
