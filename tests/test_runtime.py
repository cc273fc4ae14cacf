"""runtime.py and infer_trt.py on the tiny export of test_export.py: the ORT sampler against PyTorch,
the sidecar refusing stale or foreign files, the one-line errors of infer_trt.py, and (only where
TensorRT and a CUDA GPU exist) the engine end to end."""
import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import types

import numpy as np
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
    monkeypatch.setattr(infer_trt, "pick_device", lambda name: torch.device("cuda"))
    engine = fake_engine(tiny, str(tmp_path))
    err = cli_error(capsys, infer_trt.main, ["--engine", engine, "--backend", "trt", "--ckpt", other])
    assert "model_fp16.engine was exported from checkpoint" in err
    monkeypatch.setattr(runtime, "current_gpu_name", lambda device="cuda": "Tesla T4")
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


# ----------------------------------------------------------------------------------------------
#              TrtBackend's stream and CUDA-graph logic, on a fake TensorRT and fake CUDA
# ----------------------------------------------------------------------------------------------
# TensorRT cannot run here, so a fake engine stands in: it reads its inputs from the addresses bound to it
# (host memory: the fake runs on CPU tensors) and writes out = 2 x + t. Fake streams and graphs record
# what TrtBackend does, in order, so the protocol is checked: shapes before the enqueue, the side stream
# waiting for the main one and the main one for it, a warm-up before the capture, one capture per batch.


PROFILE = [(1, 1, 4, 4), (4, 1, 4, 4), (8, 1, 4, 4)]


class FakeCuda:
    def __init__(self, events):
        self.events, self.capturing, self.ids = events, None, iter(range(1, 100))
        self.current = self.Stream(self, 0)

    class Stream:
        def __init__(self, cuda, handle=None):
            self.cuda, self.cuda_stream = cuda, next(cuda.ids) if handle is None else handle

        def wait_stream(self, other):
            self.cuda.events.append(("wait", self.cuda_stream, other.cuda_stream))

        def synchronize(self):
            self.cuda.events.append(("sync", self.cuda_stream))

    def install(self, monkeypatch, fail_capture=False):
        cuda = self

        class Graph:
            def __init__(self):
                self.thunks = []

            def replay(self):
                cuda.events.append(("replay",))
                for thunk in self.thunks:
                    thunk()

        @contextlib.contextmanager
        def graph(g, stream=None):
            if fail_capture:
                raise RuntimeError("operation not permitted when stream is capturing")
            cuda.events.append(("capture", stream.cuda_stream))
            cuda.capturing, before, cuda.current = g, cuda.current, stream
            try:
                yield
            finally:
                cuda.capturing, cuda.current = None, before

        @contextlib.contextmanager
        def stream(s):
            before, cuda.current = cuda.current, s
            try:
                yield
            finally:
                cuda.current = before
        monkeypatch.setattr(torch.cuda, "Stream", lambda: FakeCuda.Stream(cuda))
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: cuda.current)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: cuda.events.append(("record", s.cuda_stream)))


def host_array(address, ctype, n):
    return np.ctypeslib.as_array((ctype * n).from_address(address))


class FakeContext:
    def __init__(self, cuda, number):
        self.cuda, self.number, self.shapes, self.addresses = cuda, number, {}, {}

    def set_input_shape(self, name, shape):
        self.cuda.events.append(("shape", self.number, name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return PROFILE[0][0] <= shape[0] <= PROFILE[2][0]

    def set_tensor_address(self, name, address):
        assert isinstance(address, int)
        self.cuda.events.append(("address", self.number, name))
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int) and set(self.shapes) == {"x", "t", "y"} and "out" in self.addresses
        self.cuda.events.append(("execute", self.number, stream_handle, self.cuda.capturing is not None))
        n, size = self.shapes["x"][0], int(np.prod(self.shapes["x"]))
        x_address, t_address, out_address = self.addresses["x"], self.addresses["t"], self.addresses["out"]

        def compute():                     # out = 2 x + t, read from and written to the bound addresses
            x = host_array(x_address, ctypes.c_float, size).reshape(n, -1)
            t = host_array(t_address, ctypes.c_int64, n)
            host_array(out_address, ctypes.c_float, size).reshape(n, -1)[:] = 2 * x + t[:, None]
        if self.cuda.capturing is not None:
            self.cuda.capturing.thunks.append(compute)
        else:
            compute()
        return True


def fake_tensorrt(cuda):
    contexts = []

    class Engine:
        num_io_tensors = 4

        def get_tensor_name(self, i):
            return ("x", "t", "y", "out")[i]

        def get_tensor_dtype(self, name):
            return "int64" if name in ("t", "y") else "float"

        def get_tensor_profile_shape(self, name, profile):
            return PROFILE

        def create_execution_context(self):
            contexts.append(FakeContext(cuda, len(contexts)))
            return contexts[-1]

    runtime_class = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda blob: Engine())
    logger_class = lambda severity: object()
    logger_class.WARNING = 2
    return types.SimpleNamespace(Runtime=runtime_class, Logger=logger_class, __version__="11.4-fake",
                                 DataType=types.SimpleNamespace(FLOAT="float", HALF="half", INT64="int64",
                                                                INT32="int32")), contexts


@pytest.fixture()
def fake_trt(tmp_path, monkeypatch):
    events = []
    cuda = FakeCuda(events)

    def make(cuda_graph, fail_capture=False):
        cuda.install(monkeypatch, fail_capture)
        trt, contexts = fake_tensorrt(cuda)
        monkeypatch.setattr(runtime, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(runtime, "_TRT_LOGGER", [])
        (tmp_path / "fake.engine").write_bytes(b"fake")
        backend = runtime.TrtBackend(str(tmp_path / "fake.engine"), cuda_graph=cuda_graph, meta={"profile": {}})
        backend.device = torch.device("cpu")            # the fake computes on host memory
        return backend, events, contexts
    return make


def inputs(n):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.zeros(n, dtype=torch.long)


def test_trt_backend_plain_call_orders_streams_and_sets_shapes_first(fake_trt):
    backend, events, _ = fake_trt(cuda_graph=False)
    x, t, y = inputs(3)
    events.clear()
    out = backend(x, t, y)
    assert torch.equal(out, 2 * x + t.float().view(-1, 1, 1, 1))
    side = backend.stream.cuda_stream
    kinds = [e[0] for e in events]
    assert events[0] == ("wait", side, 0)                        # the side stream waits for the inputs
    assert kinds.index("execute") > max(i for i, k in enumerate(kinds) if k in ("shape", "address"))
    assert ("execute", 0, side, False) in events                 # enqueued on the side stream, not stream 0
    assert kinds.count("record") == 4 and events[-1] == ("wait", 0, side)   # main waits for the result
    assert [e[2:] for e in events if e[0] == "shape"] == [("x", (3, 1, 4, 4)), ("t", (3,)), ("y", (3,))]


def test_trt_backend_refuses_a_batch_outside_the_profile_before_any_call(fake_trt):
    backend, events, _ = fake_trt(cuda_graph=False)
    events.clear()
    with pytest.raises(UserError, match=r"batch 9 is outside the engine's profile \[1, 8\]"):
        backend(*inputs(9))
    assert events == []


def test_trt_backend_cuda_graphs_warm_up_then_capture_once_per_batch(fake_trt):
    backend, events, contexts = fake_trt(cuda_graph=True)
    side = backend.stream.cuda_stream
    for n in (2, 2, 5):
        x, t, y = inputs(n)
        assert torch.equal(backend(x, t, y), 2 * x + t.float().view(-1, 1, 1, 1))
    kinds = [e[0] for e in events]
    assert kinds.count("capture") == 2 and kinds.count("replay") == 3 and len(contexts) == 3   # 1 plain + 1 per batch
    first = kinds.index("capture")
    shapes = [i for i, e in enumerate(events) if e[0] == "shape" and e[1] == 1]
    warm = events.index(("execute", 1, side, False))
    assert max(shapes) < warm < first < events.index(("execute", 1, side, True))   # shapes, warm-up, capture
    assert events[first] == ("capture", side) and ("sync", side) in events[warm:first]


def test_trt_backend_falls_back_when_capture_fails(fake_trt, capsys):
    backend, events, _ = fake_trt(cuda_graph=True, fail_capture=True)
    x, t, y = inputs(2)
    assert torch.equal(backend(x, t, y), 2 * x + t.float().view(-1, 1, 1, 1))
    assert backend.graphs is None and "CUDA graph capture of the engine failed" in capsys.readouterr().err
