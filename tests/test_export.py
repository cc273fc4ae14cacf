"""export.py on a tiny checkpoint: the ONNX files, their I/O, their agreement with PyTorch, the fp32
islands of the fp16 graph, the sidecars, and the one-line errors. One export per test session
(~20 s on 2 cores), shared with test_backends.py through exported_tiny()."""
import contextlib
import io
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
from support import UserError, run_cli
from support import config_dict, file_sha256, load_checkpoint, save_checkpoint
from sample import model_from_checkpoint
from diffusion import DiffusionConfig
from dit import DiT, DiTConfig

TINY = DiTConfig(image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, learn_sigma=True)


def make_checkpoint(path, seed=0, prediction="x0"):
    """A tiny DiT with every weight random (a fresh DiT outputs exactly 0: adaLN-Zero), as train.py saves it."""
    torch.manual_seed(seed)
    model = DiT(TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    diffusion = DiffusionConfig(prediction=prediction)
    save_checkpoint(path, {"model_config": config_dict(TINY), "diffusion_config": config_dict(diffusion),
                           "model": model.state_dict(), "ema": model.state_dict(),
                           "class_names": [str(i) for i in range(10)], "step": 7})
    return str(path)


_EXPORT = {}


def exported_tiny(tmp_path_factory):
    """Run export.py once on a tiny checkpoint; returns {dir, ckpt, stdout}."""
    if not _EXPORT:
        folder = tmp_path_factory.mktemp("export")
        ckpt = make_checkpoint(folder / "ckpt.pt")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            export.main(["--ckpt", ckpt, "--verify-steps", "4"])
        _EXPORT.update(dir=str(folder), ckpt=ckpt, stdout=out.getvalue())
    return _EXPORT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return exported_tiny(tmp_path_factory)


def cli_error(capsys, main, argv):
    """Run a script's main through run_cli; return the one-line error it printed (exit status must be 2)."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------

def test_files_checker_and_io(tiny):
    for name, body in (("model.onnx", onnx.TensorProto.FLOAT), ("model_fp16.onnx", onnx.TensorProto.FLOAT16)):
        path = os.path.join(tiny["dir"], name)
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        assert model.opset_import[0].version >= 20
        io_types = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.output]}
        assert [v.name for v in model.graph.input] == ["x", "t", "y"] and [v.name for v in model.graph.output] == ["out"]
        assert [io_types[n].elem_type for n in ("x", "t", "y", "out")] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                                                        onnx.TensorProto.INT64, onnx.TensorProto.FLOAT]
        batch = {io_types[n].shape.dim[0].dim_param for n in ("x", "t", "y", "out")}
        assert len(batch) == 1 and batch != {""}, "one shared symbolic batch dimension on every input and output"
        assert [d.dim_value for d in io_types["x"].shape.dim[1:]] == [1, 16, 16]
        assert [d.dim_value for d in io_types["out"].shape.dim[1:]] == [2, 16, 16]      # eps/x0 + variance
        sizes = [(i.data_type, int(np.prod(i.dims))) for i in model.graph.initializer]
        share = sum(n for dtype, n in sizes if dtype == body) / sum(n for _, n in sizes)
        assert share > 0.95, f"{name}: weights must be {onnx.TensorProto.DataType.Name(body)}, only {share:.0%} are"
    assert not os.path.exists(os.path.join(tiny["dir"], "model_fp16.engine")) or export.trt_unavailable_reason() is None
    assert not [f for f in os.listdir(tiny["dir"]) if f.startswith(".export-")], "temp folder left behind"


def test_export_prints_graph_size_parity_and_trt_skip(tiny):
    out = tiny["stdout"]
    assert "model.onnx: opset 20," in out and " nodes," in out and "LayerNormalization" in out
    assert "ORT fp32 vs torch batch   1" in out and "ORT fp16 vs torch batch   7" in out
    assert "largest pixel difference" in out and "activation peaks" in out
    if export.trt_unavailable_reason() is not None:
        assert "TensorRT engine skipped: " in out


def test_fp16_graph_keeps_norm_and_timestep_in_fp32(tiny):
    islands = export.fp32_islands(os.path.join(tiny["dir"], "model_fp16.onnx"))
    assert islands["LayerNormalization"] == (5, 5)        # 2 per block + the final layer
    assert islands["Sin"] == (1, 1) and islands["Cos"] == (1, 1)
    assert islands["Cast"] >= 12
    # The fp32 graph gives the check something to fail on: no Casts around its LayerNorms needed.
    assert export.fp32_islands(os.path.join(tiny["dir"], "model.onnx"))["Cast"] < islands["Cast"]


@pytest.mark.parametrize("name,precision", [("model.onnx", "fp32"), ("model_fp16.onnx", "fp16")])
def test_onnx_runtime_matches_pytorch(tiny, name, precision):
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"])
    session = ort.InferenceSession(os.path.join(tiny["dir"], name), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(123)
    for n in (1, 5):
        x, t, y = export.random_inputs(model.config, diffusion.num_timesteps, n, g)
        with torch.no_grad():
            ref = model(x, t, y)
        out = session.run(["out"], {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
        assert out.dtype == np.float32 and out.shape == (n, 2, 16, 16)
        e = export.errors(ref, torch.from_numpy(out))
        assert e["ref_max"] > 0.1, "a model that outputs ~0 would make the comparison meaningless"
        if precision == "fp32":
            assert e["max_abs"] < 1e-4, e
        else:
            assert e["rel"] < 1e-2 and e["rel_l2"] < 1e-2, e
            assert e["max_abs"] > 1e-6, "an fp16 graph that matches fp32 bit for bit is not fp16"


def test_tolerance_check_fails_with_clear_message():
    good = [{"batch": 1, "max_abs": 5e-5, "rel": 5e-5, "rel_l2": 1e-5, "image_rel_l2": 1e-5, "ref_max": 1.0}]
    export.check_tolerance(good, "fp32", "model.onnx")
    with pytest.raises(UserError, match=r"model\.onnx differs from PyTorch by max-abs 2\.00e-03 > 1e-04 at batch 7"):
        export.check_tolerance([{**good[0], "batch": 7, "max_abs": 2e-3}], "fp32", "model.onnx")
    export.check_tolerance([{**good[0], "rel": 3e-2}], "fp16", "model_fp16.onnx")    # one output's extreme
    with pytest.raises(UserError, match=r"by 3\.00e-02 > 1e-02 \(one image's relative L2\) at batch 1"):
        export.check_tolerance([{**good[0], "image_rel_l2": 3e-2}], "fp16", "model_fp16.onnx")
    with pytest.raises(UserError, match=r"by nan > 1e-02"):
        export.check_tolerance([{**good[0], "image_rel_l2": float("nan")}], "fp16", "model_fp16.onnx")


def test_the_fp16_gate_does_not_grow_with_the_batch_and_catches_one_broken_image():
    """Rounding noise of one size at every batch on bounded outputs (as x0 predictions are): the largest error
    over all outputs grows with the batch (more draws of the same noise), one image's relative L2 hardly does;
    one wrong image still fails."""
    g = torch.Generator().manual_seed(0)
    rows = {}
    for n in (1, 256):
        ref = torch.tanh(2 * torch.randn(n, 1, 32, 32, generator=g))
        rows[n] = export.errors(ref, ref + 2e-3 * torch.randn(ref.shape, generator=g))
    assert rows[256]["rel"] > 1.15 * rows[1]["rel"]
    assert rows[256]["image_rel_l2"] < 1.1 * rows[1]["image_rel_l2"] < export.FP16_TOLERANCE
    broken = ref.clone()
    broken[17] = -broken[17]
    assert export.errors(ref, broken)["image_rel_l2"] == pytest.approx(2.0)


def test_sidecars_record_source_and_checks(tiny):
    from support import load_sidecar
    ckpt = load_checkpoint(tiny["ckpt"])
    for name, precision in (("model.onnx", "fp32"), ("model_fp16.onnx", "fp16")):
        path = os.path.join(tiny["dir"], name)
        meta = load_sidecar(path)
        assert meta["kind"] == "onnx" and meta["precision"] == precision and meta["opset"] == 20
        assert meta["artifact_sha256"] == file_sha256(path)
        assert meta["checkpoint"]["sha256"] == file_sha256(tiny["ckpt"]) and meta["checkpoint"]["weights"] == "ema"
        assert meta["model_config"] == ckpt["model_config"] and meta["diffusion_config"] == ckpt["diffusion_config"]
        assert meta["class_names"] == ckpt["class_names"]
        assert meta["io"]["out"] == ["N", 2, 16, 16, "float32"] and meta["io"]["out_means"].startswith("x0")
        assert set(meta["versions"]) >= {"torch", "onnx", "onnxruntime"}
        assert [r["batch"] for r in meta["checks"]["ort_vs_torch"]] == [1, 7]
        # The fp16 checks run at the engine check's batch sizes (export.py's default --max-batch is 256).
        assert [r["batch"] for r in meta["checks"]["torch_fp16_vs_fp32"]["rows"]] == [1, 7, 256]
        assert meta["checks"]["ddim_pixel_difference"]["float"] < (0.5 if precision == "fp32" else 8.0)


def test_activation_peaks_are_the_block_outputs():
    model = DiT(TINY).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    outputs = []
    handle = model.blocks[1].register_forward_hook(lambda m, i, o: outputs.append(o.abs().max().item()))
    with torch.no_grad(), export.activation_peaks(model) as peaks:
        model(x, t, y)
    handle.remove()
    assert set(peaks) == {0, 1} and peaks[1][0] == pytest.approx(outputs[0])
    assert all(p[1] > 0 for p in peaks.values())
    assert not model.blocks[0]._forward_hooks, "hooks must be removed afterwards"


def test_bad_input_is_one_line(tmp_path, capsys, tiny):
    assert "does not exist" in cli_error(capsys, export.main, ["--ckpt", str(tmp_path / "nope.pt")])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = cli_error(capsys, export.main, ["--ckpt", tiny["ckpt"], "--out-dir", str(blocker / "sub")])
    assert "cannot write" in err
    err = cli_error(capsys, export.main, ["--ckpt", tiny["ckpt"], "--batch-size", "64", "--max-batch", "100"])
    assert "--max-batch 100 must be at least 2 x --batch-size = 128" in err
    assert "argument --opset: invalid choice: 17" in cli_error(capsys, export.main, ["--ckpt", tiny["ckpt"],
                                                                                   "--opset", "17"])


def test_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(export, "FP32_ATOL", -1.0)         # every graph now "differs"
    err = cli_error(capsys, export.main, ["--ckpt", ckpt])
    assert "model.onnx differs from PyTorch" in err and "do not deploy it" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"], "a failed export must leave no ONNX, sidecar or temp folder"


# ----------------------------------------------------------------------------------------------
#                     The fp16 graph in fp16 arithmetic (onnx's reference runtime)
# ----------------------------------------------------------------------------------------------

def test_fp16_graph_computed_in_fp16_matches_pytorch(tiny):
    """ONNX Runtime's CPU provider computes fp16 nodes in fp32; onnx.reference computes them in fp16."""
    from sample import TorchBackend
    from support import load_sidecar
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"])
    path = os.path.join(tiny["dir"], "model_fp16.onnx")
    rows = export.fp16_arithmetic(path, TorchBackend(model), model.config, diffusion.num_timesteps, seed=0,
                                         max_batch=256)
    heavy = sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in onnx.load(path).graph.node)
    assert [r["batch"] for r in rows] == [1, 7, 256]
    for row in rows:
        assert row["matmuls_in_fp16"] == f"{heavy}/{heavy}" and heavy > 10
        assert 1e-5 < row["image_rel_l2"] < export.FP16_TOLERANCE and row["ref_max"] > 0.1   # fp16 rounding
    ort = load_sidecar(path)["checks"]["ort_vs_torch"][0]
    assert rows[0]["rel"] > ort["rel"], "fp16 arithmetic must err more than ORT's fp32 arithmetic on the same graph"
    assert load_sidecar(path)["checks"]["fp16_arithmetic_vs_torch"] == rows      # what the export itself measured
    assert "fp16 arithmetic  batch 256:" in tiny["stdout"]


def test_the_fast_fp16_matmul_is_fp16_in_fp32_sums_out():
    """fp16_graph's MatMul through BLAS rounds as numpy's own fp16 matmul does (fp32 sums): 4,096 ones sum to
    4,096, which a running fp16 sum could not pass (2,048 + 1 = 2,048 in fp16)."""
    ones = np.ones((1, 4096), np.float16)
    assert export._fp16_matmul(ones, ones.T)[0, 0] == np.matmul(ones, ones.T)[0, 0] == 4096
    a, b = (np.random.RandomState(i).randn(9, 33).astype(np.float16) for i in (0, 1))
    fast, slow = export._fp16_matmul(a, b.T), np.matmul(a, b.T)
    assert fast.dtype == np.float16 and np.abs(fast.astype(np.float32) - slow).max() <= 2 ** -10 * np.abs(slow).max()


def test_fp16_arithmetic_catches_an_overflow(tmp_path):
    """Patch embeddings beyond 65504 are inf in fp16 (NaN after the LayerNorm): the check refuses the graph."""
    from sample import LowPrecision, TorchBackend
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    model, diffusion, _, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():
        model.x_embedder.weight.mul_(1e6)             # fp16 weights up to ~5e4, their sums past 65504
    path = str(tmp_path / "model_fp16.onnx")
    example = export.random_inputs(model.config, 1000, 2, torch.Generator().manual_seed(0))
    export.export_onnx(LowPrecision(model, torch.float16), path, example, 20)
    with pytest.raises(UserError, match="computed in fp16 gives inf or NaN"):
        export.fp16_arithmetic(path, TorchBackend(model), model.config, diffusion.num_timesteps, seed=0,
                                      max_batch=8)
