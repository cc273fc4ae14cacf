"""runtime.py and infer_trt.py on the tiny export of test_export.py: the ORT sampler against PyTorch,
the sidecar refusing stale or foreign files, the one-line errors of infer_trt.py, and (only where
TensorRT and a CUDA GPU exist) the engine end to end."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import runtime
import export
import infer_trt
from cli import UserError, load_checkpoint
from runtime import model_from_checkpoint
from test_export import cli_error, exported_tiny, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TRT = runtime.trt_unavailable_reason() is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return exported_tiny(tmp_path_factory)


def artifact(tiny, name="model.onnx"):
    return os.path.join(tiny["dir"], name)


def fake_engine(tiny, folder, **changes):
    """An engine file with a sidecar as export.py writes one; never deserialised (the checks come first)."""
    path = os.path.join(folder, "model_fp16.engine")
    with open(path, "wb") as f:
        f.write(b"not a real engine")
    meta = {k: v for k, v in runtime.load_sidecar(artifact(tiny, "model_fp16.onnx")).items()
            if k not in ("format", "version", "artifact", "artifact_sha256")}
    meta.update(kind="engine", gpu={"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]},
                profile={"min": 1, "opt": 32, "max": 256}, **changes)
    runtime.write_sidecar(path, meta)
    return path


def draw(fn, diffusion, config, sampler="ddim", device="cpu", steps=6, cfg_scale=2.0, seed=3):
    """A short fixed-seed sample of 4 images with guidance (so the model sees a doubled batch of 8)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 3, 7, 9])
    return diffusion.sample(fn, (4, 1, 16, 16), y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                            null_class=config.null_class, generator=g, device=device).cpu()


# ----------------------------------------------------------------------------------------------
#                                    Backends and sidecars
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ort_sample_equals_torch_sample(tiny, sampler):
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"])
    ort_fn = runtime.OrtBackend(artifact(tiny), ckpt_path=tiny["ckpt"])
    reference = draw(runtime.TorchBackend(model), diffusion, model.config, sampler)
    images = draw(ort_fn, diffusion, model.config, sampler)
    assert images.shape == (4, 1, 16, 16) and images.abs().max() > 0.1
    assert (images - reference).abs().max().item() * 127.5 < 0.5       # < half a grey level of 255


def test_backend_call_contract(tiny):
    model, _, _, _ = model_from_checkpoint(tiny["ckpt"])
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 999]), torch.tensor([0, 10, 4])
    for fn in (runtime.TorchBackend(model), runtime.open_backend("ort", artifact(tiny, "model_fp16.onnx"))):
        out = fn(x, t, y)
        assert out.dtype == torch.float32 and out.shape == (3, 2, 16, 16) and out.device == x.device


def test_sidecar_refuses_another_checkpoint(tiny, tmp_path):
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(UserError) as e:
        runtime.OrtBackend(artifact(tiny), ckpt_path=other)
    msg = str(e.value)
    assert tiny["ckpt"] in msg and other in msg and f"rerun `python export.py --ckpt {other}`" in msg
    ckpt = load_checkpoint(tiny["ckpt"])
    ckpt["model_config"] = {**ckpt["model_config"], "depth": 3}
    with pytest.raises(UserError, match="another model_config than the checkpoint's"):
        runtime.check_sidecar(runtime.load_sidecar(artifact(tiny)), artifact(tiny), ckpt=ckpt)


def test_sidecar_refuses_changed_missing_or_foreign_files(tiny, tmp_path):
    copy = str(tmp_path / "model.onnx")
    with pytest.raises(UserError, match="does not exist; run `python export.py"):
        runtime.load_sidecar(copy)
    shutil.copy(artifact(tiny), copy)
    with pytest.raises(UserError, match=r"model\.onnx\.json is missing"):
        runtime.load_sidecar(copy)
    shutil.copy(artifact(tiny) + ".json", copy + ".json")
    runtime.check_sidecar(runtime.load_sidecar(copy), copy)            # an intact copy is fine
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="differs from the file its sidecar describes"):
        runtime.OrtBackend(copy)
    with open(copy + ".json", "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="not a readable sidecar"):
        runtime.load_sidecar(copy)


def test_engine_sidecar_refuses_another_gpu(tiny, tmp_path):
    path = fake_engine(tiny, str(tmp_path))
    meta = runtime.load_sidecar(path)
    runtime.check_sidecar(meta, path, gpu_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(UserError, match=r"built for GPU 'NVIDIA H100 80GB HBM3', this machine has 'Tesla T4'"):
        runtime.check_sidecar(meta, path, gpu_name="Tesla T4")


def test_profile_check_message():
    meta = {"profile": {"min": 1, "opt": 32, "max": 256}}
    runtime.check_profile(meta, 1)
    runtime.check_profile(meta, 256)
    with pytest.raises(UserError) as e:
        runtime.check_profile(meta, 300)
    assert str(e.value).startswith("batch 300 is outside the engine's profile [1, 256]")
    assert str(e.value).endswith("rebuild with export.py --max-batch 300")


@pytest.mark.skipif(not NO_TRT, reason="TensorRT and a GPU are present here")
def test_without_tensorrt_nothing_touches_it():
    with pytest.raises(UserError, match=r"TensorRT is not installed|no CUDA GPU"):
        runtime.import_tensorrt()
    with pytest.raises(UserError, match="use --backend ort"):
        runtime.TrtBackend("missing.engine", meta={"model_config": {}})


# ----------------------------------------------------------------------------------------------
#                                        infer_trt.py
# ----------------------------------------------------------------------------------------------

def test_infer_ort_compare_and_same_images_as_sample_py(tiny, tmp_path, capsys):
    import sample
    png = str(tmp_path / "ort.png")
    infer_trt.main(["--onnx", artifact(tiny), "--backend", "ort", "--labels", "7 seven 3", "--steps", "5",
                    "--compare", "--out", png])
    out = capsys.readouterr().out
    assert os.path.isfile(png) and open(png[:-4] + ".txt").read() == "7 7 3\n"
    diff = float(out.split("largest pixel difference ort vs torch: ")[1].split(" /")[0])
    assert diff < 0.5 and "ms per network call" in out
    # The torch backend of infer_trt.py and sample.py draw the very same images from a seed.
    infer_trt.main(["--ckpt", tiny["ckpt"], "--backend", "torch", "--num-samples", "5", "--steps", "4",
                    "--batch-size", "2", "--out", str(tmp_path / "a.png")])
    sample.main(["--ckpt", tiny["ckpt"], "--num-samples", "5", "--steps", "4", "--batch-size", "2",
                 "--out", str(tmp_path / "b.png")])
    assert open(tmp_path / "a.png", "rb").read() == open(tmp_path / "b.png", "rb").read()


@pytest.mark.skipif(not NO_TRT, reason="TensorRT and a GPU are present here")
def test_infer_trt_requested_without_tensorrt_is_one_line(tiny):
    """A real process: exit status 2 and exactly the one line, no traceback."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "infer_trt.py"), "--onnx", artifact(tiny),
                        "--backend", "trt"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() in (
        "infer_trt.py: error: TensorRT is not installed (pip install -r requirements-gpu.txt on a CUDA machine); "
        "use --backend ort",
        "infer_trt.py: error: no CUDA GPU is available, and TensorRT needs one; use --backend ort")


def test_infer_bad_input_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    assert "does not exist" in cli_error(capsys, infer_trt.main, ["--onnx", str(tmp_path / "nope.onnx"),
                                                                  "--backend", "ort"])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = cli_error(capsys, infer_trt.main, ["--onnx", artifact(tiny), "--out", str(blocker / "x.png")])
    assert "error: cannot write to" in err and "a_file: it is a file, not a folder" in err
    assert "unknown label 'eleven'" in cli_error(capsys, infer_trt.main, ["--onnx", artifact(tiny), "--labels", "eleven"])
    other = make_checkpoint(tmp_path / "other.pt", seed=2)
    err = cli_error(capsys, infer_trt.main, ["--onnx", artifact(tiny), "--ckpt", other])
    assert "was exported from checkpoint" in err and "rerun `python export.py --ckpt" in err

    # The engine checks come before TensorRT is touched: pretend it is usable to reach them on a CPU.
    monkeypatch.setattr(infer_trt, "trt_unavailable_reason", lambda: None)
    engine = fake_engine(tiny, str(tmp_path))
    err = cli_error(capsys, infer_trt.main, ["--engine", engine, "--backend", "trt", "--ckpt", other])
    assert "model_fp16.engine was exported from checkpoint" in err
    monkeypatch.setattr(runtime, "current_gpu_name", lambda: "Tesla T4")
    err = cli_error(capsys, infer_trt.main, ["--engine", engine, "--backend", "trt"])
    assert "built for GPU 'NVIDIA H100 80GB HBM3', this machine has 'Tesla T4'" in err
    os.remove(engine)
    assert "model_fp16.engine does not exist" in cli_error(capsys, infer_trt.main, ["--engine", engine,
                                                                                    "--backend", "trt"])


# ----------------------------------------------------------------------------------------------
#                          TensorRT end to end (GPU + TensorRT only)
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(NO_TRT, reason="needs TensorRT and a CUDA GPU (runtime.trt_unavailable_reason())")
def test_tensorrt_engine_end_to_end(tiny, tmp_path, capsys):
    onnx_path = artifact(tiny, "model_fp16.onnx")
    engine, cache = str(tmp_path / "model_fp16.engine"), str(tmp_path / "model_fp16.timing.cache")
    version = export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16), opt_level=1)
    assert os.path.getsize(engine) > 0 and os.path.getsize(cache) > 0
    meta = {k: v for k, v in runtime.load_sidecar(onnx_path).items()
            if k not in ("format", "version", "artifact", "artifact_sha256")}
    runtime.write_sidecar(engine, {**meta, "kind": "engine", "versions": {"tensorrt": version},
                                    "gpu": {"name": runtime.current_gpu_name()},
                                    "profile": {"min": 1, "opt": 8, "max": 16}})
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"], "cuda")
    torch_fn = runtime.TorchBackend(model)
    plain = runtime.TrtBackend(engine, ckpt_path=tiny["ckpt"])
    graphed = runtime.TrtBackend(engine, cuda_graph=True)
    rows = export.parity(torch_fn, plain, model.config, diffusion.num_timesteps, batch_sizes=(1, 7, 16))
    assert all(r["rel"] < 1e-2 for r in rows), rows
    x, t, y = (v.cuda() for v in export.random_inputs(model.config, 1000, 5, torch.Generator().manual_seed(0)))
    first = graphed(x, t, y)
    assert torch.equal(first, plain(x, t, y)) and torch.equal(graphed(x, t, y), first)   # replays, same answer
    with pytest.raises(UserError, match=r"batch 17 is outside the engine's profile \[1, 16\]"):
        plain(*(torch.cat([v] * 4)[:17] for v in (x, t, y)))
    images = draw(plain, diffusion, model.config, device="cuda")
    assert (images - draw(torch_fn, diffusion, model.config, device="cuda")).abs().max().item() * 127.5 < 10
