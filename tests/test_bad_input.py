"""The bad-input matrix (issue: never a stack trace): each case runs a script's main() through
support.run_cli and checks exit status 2 and a single line on stderr that names the problem.

ONNX/engine cases (file from another checkpoint, another GPU, batch outside the engine profile, TensorRT
missing) run against real exported files in tests/test_backends.py and tests/test_export.py."""
import gzip
import hashlib
import os
import pickle
import shutil
import sys

import pytest
import torch

import support
import tool_flags
import data
import sample
import train
from diffusion import DiffusionConfig
from dit import DiT, DiTConfig

from conftest import MNIST
from test_train import TINY_MODEL
TINY = DiTConfig(image_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2)


def one_line_error(capsys, monkeypatch, script, main, argv):
    """Run main via run_cli; return the error line after checking exit status 2 and a single line."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        support.run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{script}: error: "), err
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    support.save_checkpoint(path, {"model_config": support.config_dict(TINY),
                                  "diffusion_config": support.config_dict(DiffusionConfig(prediction="x0")),
                                  "model": DiT(TINY).state_dict(), "ema": None, "step": 0,
                                  "class_names": [str(i) for i in range(10)]})
    return str(path)


# ---------------------------------------------------------------- checkpoints given to sample.py

class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def resave(state, path):
    """torch.save a changed checkpoint with a fresh checksum, as a well-meaning tool would."""
    state = {k: v for k, v in state.items() if k != "sha256"}
    torch.save({**state, "sha256": support.content_sha256(state)}, path)


def flip_a_weight_byte(good, path):
    """Copy good with one bit flipped in the middle of its largest tensor's bytes (the zip's CRCs are not checked)."""
    import zipfile
    with zipfile.ZipFile(good) as z:
        entry = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(open(good, "rb").read())
    name_len, extra_len = int.from_bytes(raw[entry.header_offset + 26:entry.header_offset + 28], "little"), \
        int.from_bytes(raw[entry.header_offset + 28:entry.header_offset + 30], "little")
    raw[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))


def bad_checkpoints(folder, good):
    """name -> (path, expected words in the message)."""
    raw = open(good, "rb").read()
    cases = {}
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (folder / "truncated.pt", "not a readable checkpoint")
    (folder / "random.pt").write_bytes(os.urandom(4096))
    cases["random bytes"] = (folder / "random.pt", "not a readable checkpoint")
    torch.save({"a": Evil()}, folder / "evil.pt")
    cases["pickled code"] = (folder / "evil.pt", "pickled code")
    with open(folder / "plain.pkl", "wb") as f:
        pickle.dump({"format": support.CHECKPOINT_FORMAT}, f)
    cases["plain pickle"] = (folder / "plain.pkl", "not a readable checkpoint")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    cases["another project's .pt"] = (folder / "foreign.pt", "not a DiT checkpoint")
    state = torch.load(good, weights_only=True)
    torch.save({**state, "version": 99}, folder / "future.pt")
    cases["format version"] = (folder / "future.pt", "format version 99")
    bigger = {**state, "model_config": {**state["model_config"], "hidden_size": 32}}
    resave(bigger, folder / "mismatch.pt")
    cases["weights of another model"] = (folder / "mismatch.pt", "do not match")
    resave({**state, "model_config": {**state["model_config"], "wings": 2}}, folder / "unknown.pt")
    cases["unknown config field"] = (folder / "unknown.pt", "config this code does not understand")
    resave({k: v for k, v in state.items() if k != "model_config"}, folder / "no_config.pt")
    cases["no model config"] = (folder / "no_config.pt", "lacks model_config")
    flip_a_weight_byte(good, folder / "flipped.pt")
    cases["one flipped byte in the weights"] = (folder / "flipped.pt", "is damaged: its content does not match")
    torch.save({**state, "model": {**state["model"], "x_embedder.bias": state["model"]["x_embedder.bias"] + 1}},
               folder / "edited.pt")
    cases["weights edited, old checksum"] = (folder / "edited.pt", "is damaged")
    cases["missing file"] = (folder / "nope.pt", "does not exist")
    return cases


def test_bad_checkpoints(ckpt, tmp_path, capsys, monkeypatch):
    for name, (path, words) in bad_checkpoints(tmp_path, ckpt).items():
        err = one_line_error(capsys, monkeypatch, "sample.py", sample.main, ["--ckpt", str(path), "--out",
                                                                              str(tmp_path / "g.png")])
        assert words in err and str(path) in err, (name, err)


# ---------------------------------------------------------------- sampling flags and labels

@pytest.mark.parametrize("argv,words", [
    (["--labels", "2 elevn 4"], "unknown label 'elevn'"),
    (["--labels", "3 10"], "label 10 is out of range"),
    (["--labels", "-1"], "label -1 is out of range"),
    (["--labels", "3 --2"], "unknown label '--2'"),
    (["--labels", "--1"], "argument --labels: expected one argument"),
    (["--device", "mps"], "unknown or unsupported --device 'mps'"),
    (["--threads", "-1"], "argument --threads: must be an integer > 0, got -1"),
    (["--num-samples", "0"], "argument --num-samples: must be an integer > 0, got 0"),
    (["--steps", "0"], "argument --steps: must be an integer > 0, got 0"),
    (["--steps", "-5"], "argument --steps: must be an integer > 0, got -5"),
    (["--steps", "1001"], "--steps 1001 is outside 1-1000, the timesteps the model was trained with"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: must be a number >= 0, got nan"),
    (["--eta", "inf"], "argument --eta: must be a number >= 0, got inf"),
    (["--steps", "2.5"], "argument --steps: expected an integer > 0, got '2.5'"),
    (["--labels", "1", "--num-samples", "3"], "either --labels or --num-samples"),
    (["--device", "cuda:0"], "no CUDA GPU"),
])
def test_bad_sampling_flags(ckpt, tmp_path, capsys, monkeypatch, argv, words):
    if argv[:2] == ["--device", "cuda:0"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    err = one_line_error(capsys, monkeypatch, "sample.py", sample.main,
                         ["--ckpt", ckpt, "--out", str(tmp_path / "g.png"), *argv])
    assert words in err, err


def test_unwritable_outputs(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    err = one_line_error(capsys, monkeypatch, "sample.py", sample.main,
                         ["--ckpt", ckpt, "--out", str(tmp_path / "file" / "g.png")])
    assert "cannot write" in err
    err = one_line_error(capsys, monkeypatch, "train.py", train.main,
                         [*TINY_MODEL, "--data-dir", str(tmp_path), "--out", str(tmp_path / "file" / "run")])
    assert "cannot write" in err or str(tmp_path / "file") in err


# ---------------------------------------------------------------- training flags and data

@pytest.mark.parametrize("argv,words", [
    (["--steps", "0"], "argument --steps: must be an integer > 0, got 0"),
    (["--steps", "-3"], "argument --steps: must be an integer > 0, got -3"),
    (["--model", "DiT-Q/3"], "unknown --model 'DiT-Q/3'"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
])
def test_bad_training_flags(tmp_path, capsys, monkeypatch, argv, words):
    err = one_line_error(capsys, monkeypatch, "train.py", train.main,
                         [*TINY_MODEL, "--data-dir", MNIST, "--out", str(tmp_path / "run"), *argv])
    assert words in err, err


@pytest.fixture()
def mnist_copy(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(MNIST, folder)
    return folder


def corrupt_labels(folder, how):
    path = folder / "train-labels-idx1-ubyte.gz"
    raw = path.read_bytes()
    if how == "bad md5":                      # a valid gzip of one changed label
        payload = bytearray(gzip.decompress(raw))
        payload[-1] = (payload[-1] + 1) % 10
        path.write_bytes(gzip.compress(bytes(payload)))
    elif how == "truncated gzip":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "wrong IDX magic":
        payload = bytearray(gzip.decompress(raw))
        payload[3] = 0x03
        path.write_bytes(gzip.compress(bytes(payload)))
    elif how == "missing":
        path.unlink()
    return path


@pytest.mark.parametrize("how,words", [
    ("bad md5", "does not match"), ("truncated gzip", "truncated gzip"),
    ("wrong IDX magic", "does not match"), ("missing", "train-labels-idx1-ubyte"),
])
def test_corrupt_dataset_files_stop_training_with_one_line(mnist_copy, tmp_path, capsys, monkeypatch, how, words):
    path = corrupt_labels(mnist_copy, how)
    err = one_line_error(capsys, monkeypatch, "train.py", train.main,
                         [*TINY_MODEL, "--data-dir", str(mnist_copy), "--out", str(tmp_path / "run")])
    assert words in err and path.name in err, err


@pytest.mark.parametrize("how,words", [("truncated gzip", "truncated"), ("wrong IDX magic", "magic")])
def test_corrupt_file_that_passes_md5_names_the_real_problem(mnist_copy, tmp_path, monkeypatch, how, words):
    # With the MD5 gate passed (sums registered for these very files), the IDX parser's own checks speak.
    path = corrupt_labels(mnist_copy, how)
    sums = dict(data.IDX_MD5["mnist"])
    sums["train-labels-idx1-ubyte"] = (hashlib.md5(path.read_bytes()).hexdigest(), "")
    monkeypatch.setitem(data.IDX_MD5, "mnist", sums)
    with pytest.raises(data.DataError) as e:
        data.load_dataset("mnist", data_dir=str(mnist_copy))
    assert words in str(e.value).lower() and path.name in str(e.value) and "\n" not in str(e.value)


def test_folder_dataset_without_images(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    err = one_line_error(capsys, monkeypatch, "train.py", train.main,
                         [*TINY_MODEL, "--dataset", "folder", "--data-dir", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "run")])
    assert "no images" in err, err


# ---------------------------------------------------------------- sidecars edited by hand

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from test_export import exported_tiny
    return exported_tiny(tmp_path_factory)


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["diffusion_config"].update(prediction="eps"), "was changed after export"),
    (lambda m: m.update(class_names=m["class_names"][::-1]), "was changed after export"),
    (lambda m: m.pop("model_config"), "was changed after export"),
    (lambda m: m.update(sidecar_sha256="0" * 64), "was changed after export"),
])
def test_an_edited_sidecar_is_refused(exported, tmp_path, capsys, monkeypatch, edit, words):
    import json
    import infer_trt
    onnx_path = tmp_path / "model.onnx"
    shutil.copy(os.path.join(exported["dir"], "model.onnx"), onnx_path)
    meta = json.loads(open(os.path.join(exported["dir"], "model.onnx.json")).read())
    edit(meta)
    (tmp_path / "model.onnx.json").write_text(json.dumps(meta))
    err = one_line_error(capsys, monkeypatch, "infer_trt.py", infer_trt.main,
                         ["--onnx", str(onnx_path), "--backend", "ort", "--out", str(tmp_path / "g.png")])
    assert words in err and "rerun export.py" in err, err


# ---------------------------------------------------------------- what used to crash or answer wrongly

@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_one_sampling_step_works(ckpt, tmp_path, sampler):
    sample.main(["--ckpt", ckpt, "--steps", "1", "--sampler", sampler, "--num-samples", "4",
                 "--out", str(tmp_path / "one.png")])
    assert os.path.getsize(tmp_path / "one.png") > 0


@pytest.mark.parametrize("argv,words", [
    (["--max-minutes", "nan"], "argument --max-minutes: must be a number > 0, got nan"),
    (["--grad-clip", "nan"], "argument --grad-clip: must be a number >= 0, got nan"),
    (["--sample-cfg", "inf"], "argument --sample-cfg: must be a number >= 0, got inf"),
    (["--ema-decay", "1.5"], "argument --ema-decay: must be a number in [0, 1), got 1.5"),
    (["--prediction", "noise"], "argument --prediction: invalid choice: 'noise'"),
])
def test_impossible_training_flags_are_one_line_before_torch_loads(tmp_path, capsys, monkeypatch, argv, words):
    err = one_line_error(capsys, monkeypatch, "train.py", lambda: train.parse_args(argv), [])
    assert words in err, err


def test_score_per_class_zero_is_one_line(capsys, monkeypatch):
    import evaluate
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    with pytest.raises(SystemExit) as e:
        support.run_cli(lambda: evaluate.main(["score", "--npz", "x.npz", "--per-class", "0"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "evaluate.py score: error: argument --per-class: must be an integer > 0, got 0\n"


# ---------------------------------------------------------------- the command lines themselves

SCRIPTS = ("train.py", "sample.py", "export.py", "infer_trt.py", "tools/evaluate.py", "tools/bench.py",
           "tools/plot_curve.py", "tools/ship_checkpoint.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_loading_torch(script):
    """--help must not wait for PyTorch (seconds to import): the flags are parsed before it loads."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({os.path.join(root, script)!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('TORCH LOADED' if 'torch' in sys.modules else 'no torch')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert res.returncode == 0 and res.stdout.strip().endswith("no torch"), res.stdout[-500:] + res.stderr[-500:]
    assert "usage:" in res.stdout


def parsers():
    import export
    import infer_trt
    import bench
    return {"train.py": train.train_parser(), "sample.py": sample_parser(), "export.py": parser_of(export.parse_args),
            "infer_trt.py": infer_trt.infer_parser(), "tools/bench.py": parser_of(tool_flags.parse_bench_args),
            **{f"tools/evaluate.py {c}": p for c, p in evaluate_subparsers().items()}}


def parser_of(parse_args):
    """The ArgumentParser a script's parse_args builds, caught as it parses --help."""
    import argparse
    caught = []
    real = argparse.ArgumentParser.parse_args

    def catch(self, *a, **k):
        caught.append(self)
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = catch
    try:
        parse_args(["--help"])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return caught[0]


def sample_parser():
    return parser_of(sample.parse_args)


def evaluate_subparsers():
    import argparse
    import evaluate
    top = parser_of(tool_flags.parse_evaluate_args)
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_and_shows_its_default():
    for name, parser in parsers().items():
        for action in parser._actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
        assert isinstance(parser, support.ArgumentParser), name          # its --help shows every default


def test_sample_and_infer_trt_take_the_same_sampling_flags():
    import infer_trt
    flags = lambda p: {s for a in p._actions for s in a.option_strings}
    shared = flags(sample_parser()) & flags(infer_trt.infer_parser())
    for flag in ("--labels", "--num-samples", "--sampler", "--steps", "--cfg-scale", "--eta", "--seed",
                 "--batch-size", "--out", "--device", "--threads"):
        assert flag in shared, flag


def test_choices_spelled_out_for_fast_flags_match_the_code():
    """The flags parse before PyTorch loads, so train.py and support.py spell out choices that diffusion.py and
    data.py own: the copies must stay equal. The diffusion's defaults are the training flags' defaults, and the
    flags are the settings' fields in order (so a checkpoint's "args" keep their layout)."""
    import dataclasses
    import diffusion
    import evaluate
    import infer_trt
    import mnist_cnn
    choices = {a.dest: tuple(a.choices) for a in train.train_parser()._actions if a.choices}
    assert choices["prediction"] == diffusion.PREDICTIONS == train.PREDICTIONS
    assert choices["timestep_sampling"] == diffusion.TIMESTEP_SAMPLINGS
    assert choices["loss_weight"] == diffusion.LOSS_WEIGHTS and choices["schedule"] == diffusion.SCHEDULES
    assert choices["dataset"] == data.DATASETS and support.SAMPLERS == diffusion.SAMPLERS
    assert set(infer_trt.BACKENDS) == {"trt", "ort", "torch"} and tool_flags.CLASSIFIER == mnist_cnn.CLASSIFIER_PATH
    settings, config = train.TrainSettings(), diffusion.DiffusionConfig()
    for field in ("num_timesteps", "schedule", "prediction", "timestep_sampling", "loss_weight", "snr_gamma"):
        assert getattr(settings, field) == getattr(config, field), field
    flags = [a.dest for a in train.train_parser()._actions if a.dest != "help"]
    assert flags == [f.name for f in dataclasses.fields(train.TrainSettings)]
    assert vars(train.train_parser().parse_args([])) == dataclasses.asdict(train.TrainSettings())


def test_the_flags_and_the_support_module_load_without_torch():
    import subprocess
    code = "import support, sys; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.stdout.strip() == "False", res.stderr


@pytest.mark.parametrize("argv,words", [
    (["score", "--npz", "/dev/null"], "cannot read /dev/null"),
    (["table", "--ckpt", "x.pt", "--cfg-scales", "2,a"], "argument --cfg-scales: expected a number >= 0, got 'a'"),
    (["score", "--npz", "x.npz", "--cfg-scale", "nan"], "argument --cfg-scale: must be a number >= 0, got nan"),
])
def test_evaluate_bad_input_is_one_line(capsys, monkeypatch, argv, words):
    import evaluate
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    with pytest.raises(SystemExit) as e:
        support.run_cli(lambda: evaluate.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err, err
