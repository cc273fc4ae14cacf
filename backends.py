"""
The model call on three runtimes, so diffusion.py's samplers run unchanged on any of them:

    TorchBackend(model)            eager PyTorch, the reference
    OrtBackend("model.onnx")       ONNX Runtime: CPU, or CUDA when onnxruntime-gpu is installed
    TrtBackend("model_fp16.engine") a TensorRT 11 engine on a CUDA GPU, optionally through CUDA graphs

Each is a callable  out = f(x, t, y)  with x float32 (N, C, H, W), t and y int64 (N,) torch tensors,
returning float32 `out` (N, C_out, H, W) on `f.device`: the network's raw prediction (eps, x0 or v, as
the checkpoint's diffusion_config.prediction says, then the variance channels if learned).

Files written by export.py carry a JSON sidecar (`<file>.json`) naming the checkpoint they came from
(its SHA-256), the model and diffusion configs, the class names, the versions and, for an engine, the
GPU and batch profile. Backends refuse a file whose sidecar is missing or disagrees with the file,
the checkpoint or the GPU: a stale engine otherwise samples wrong images without any error.

TensorRT is imported lazily and never touched without a CUDA device: on a GPU-less machine its
calls can segfault the process instead of raising (see ../shared/notes/tensorrt_onnx.md, 1.2).
"""
import importlib.util
import json
import os
import time

import numpy as np
import torch

from common import UserError, atomic_write, file_sha256, model_from_checkpoint

BACKENDS = ("trt", "ort", "torch")      # fastest first: the default is the first one available
IO_NAMES = ("x", "t", "y", "out")


# ----------------------------------------------------------------------------------------------
#                                 Sidecars: what a file was built from
# ----------------------------------------------------------------------------------------------

SIDECAR_FORMAT = "dit-export"
SIDECAR_VERSION = 1


def sidecar_path(artifact):
    return os.fspath(artifact) + ".json"


def write_sidecar(artifact, meta):
    """Write `<artifact>.json` with meta plus the artifact's own hash (detects a file swapped after export)."""
    meta = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "artifact": os.path.basename(artifact),
            "artifact_sha256": file_sha256(artifact), **meta}
    atomic_write(sidecar_path(artifact), lambda f: json.dump(meta, f, indent=1), binary=False)
    return meta


def load_sidecar(artifact):
    """Read the sidecar of an ONNX file or engine; a missing or unreadable one is a one-line UserError."""
    artifact = os.fspath(artifact)
    if not os.path.isfile(artifact):
        raise UserError(f"{artifact} does not exist; run `python export.py --ckpt RUN/ckpt.pt` first")
    path = sidecar_path(artifact)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing, so {artifact} cannot be matched to a checkpoint; "
                        f"rerun export.py to write both")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable sidecar ({type(e).__name__}); rerun export.py") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
        raise UserError(f"{path} is not a sidecar written by this export.py (format {SIDECAR_FORMAT} "
                        f"v{SIDECAR_VERSION}); rerun export.py")
    return meta


def current_gpu_name():
    """Name of CUDA device 0, or None without a GPU (engines are tied to the GPU they were built on)."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def check_sidecar(meta, artifact, ckpt_path=None, ckpt=None, gpu_name=None):
    """Refuse an artifact that changed after export, comes from another checkpoint, or (engines) another GPU.
    ckpt_path: compare hashes; ckpt: the loaded checkpoint dict, compare configs; gpu_name: this machine's GPU."""
    artifact = os.fspath(artifact)
    if file_sha256(artifact) != meta.get("artifact_sha256"):
        raise UserError(f"{artifact} differs from the file its sidecar describes (replaced after export?); "
                        f"rerun export.py")
    source = meta.get("checkpoint", {})
    fix = f"rerun `python export.py --ckpt {ckpt_path}`" if ckpt_path else "rerun export.py"
    if ckpt_path is not None:
        digest = file_sha256(ckpt_path)
        if digest != source.get("sha256"):
            raise UserError(f"{artifact} was exported from checkpoint {source.get('path')} "
                            f"(sha256 {str(source.get('sha256'))[:12]}), not from {ckpt_path} "
                            f"(sha256 {digest[:12]}); {fix}")
    if ckpt is not None:
        for key in ("model_config", "diffusion_config"):
            if ckpt.get(key) != meta.get(key):
                raise UserError(f"{artifact} was exported with another {key} than the checkpoint's; {fix}")
    built_on = (meta.get("gpu") or {}).get("name")
    if meta.get("kind") == "engine" and gpu_name is not None and built_on != gpu_name:
        raise UserError(f"{artifact} was built for GPU {built_on!r}, this machine has {gpu_name!r}; "
                        f"TensorRT engines only run on the GPU they were built for: rerun export.py here")


def check_profile(meta, batch, artifact="the engine"):
    """An engine runs only batch sizes inside the optimisation profile it was built with."""
    bounds = meta.get("profile")
    if bounds and not bounds["min"] <= batch <= bounds["max"]:
        raise UserError(f"batch {batch} is outside the engine's profile [{bounds['min']}, {bounds['max']}] "
                        f"({artifact}); rebuild with export.py --max-batch {max(batch, bounds['max'])}")


# ----------------------------------------------------------------------------------------------
#                                  PyTorch and ONNX Runtime
# ----------------------------------------------------------------------------------------------

class TorchBackend:
    """The eager PyTorch model: the baseline every other backend is compared against."""

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.name = "torch"

    @torch.no_grad()
    def __call__(self, x, t, y):
        d = self.device
        return self.model(x.to(d, torch.float32), t.to(d), y.to(d)).float()


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32}


class OrtBackend:
    """An ONNX file in ONNX Runtime; numpy I/O converted from/to torch. CUDA EP when available.
    The sidecar is checked (against ckpt_path / ckpt when given) unless meta, an already checked one, is passed."""

    def __init__(self, onnx_path, providers=None, ckpt_path=None, ckpt=None, meta=None):
        import onnxruntime as ort
        if meta is None:
            meta = load_sidecar(onnx_path)
            check_sidecar(meta, onnx_path, ckpt_path, ckpt)
        self.meta, self.name, self.device = meta, "ort", torch.device("cpu")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(os.fspath(onnx_path), providers=providers)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"ONNX Runtime cannot load {onnx_path} ({first[:160]}); rerun export.py") from None
        names = [i.name for i in self.session.get_inputs()] + [o.name for o in self.session.get_outputs()]
        if names != list(IO_NAMES):
            raise UserError(f"{onnx_path} has I/O {names}, expected {list(IO_NAMES)}; export it with export.py")
        self.input_types = {i.name: _NUMPY_TYPES[i.type] for i in self.session.get_inputs()}
        self.providers = self.session.get_providers()

    def __call__(self, x, t, y):
        feeds = {name: v.detach().cpu().numpy().astype(self.input_types[name], copy=False)
                 for name, v in (("x", x), ("t", t), ("y", y))}
        out = self.session.run(["out"], feeds)[0]
        return torch.from_numpy(out).float().to(x.device)


# ----------------------------------------------------------------------------------------------
#                                          TensorRT
# ----------------------------------------------------------------------------------------------

TRT_MISSING = "TensorRT is not installed (pip install -r requirements-gpu.txt on a CUDA machine)"


def trt_unavailable_reason():
    """None when TensorRT can be used here, else why not. Checks without importing or calling TensorRT."""
    if importlib.util.find_spec("tensorrt") is None:
        return TRT_MISSING
    if not torch.cuda.is_available():
        return "no CUDA GPU is available, and TensorRT needs one"
    return None


def import_tensorrt():
    """The tensorrt module, only where a CUDA device exists; otherwise a one-line UserError."""
    reason = trt_unavailable_reason()
    if reason:
        raise UserError(f"{reason}; use --backend ort")
    try:
        import tensorrt as trt
    except ImportError as e:   # e.g. the bindings wheel without its libs wheel
        raise UserError(f"TensorRT does not import ({str(e)[:120]}); reinstall it from requirements-gpu.txt, "
                        f"or use --backend ort") from None
    return trt


_TRT_LOGGER = []


def trt_logger(trt):
    """One process-wide logger (TensorRT keeps a pointer to it in every builder and runtime)."""
    if not _TRT_LOGGER:
        _TRT_LOGGER.append(trt.Logger(trt.Logger.WARNING))
    return _TRT_LOGGER[0]


def torch_dtype(trt, dtype):
    """TensorRT DataType -> torch dtype of the tensor we bind to it."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
    return table[dtype]


class TrtBackend:
    """A TensorRT engine: torch CUDA tensors bound by address, execute_async_v3 on a side stream.

    cuda_graph=True records one CUDA graph per batch size (the sampler repeats the same call 10-1000
    times, so launching one graph replaces TensorRT's per-call kernel launches). A graph bakes in
    every address and shape, so each batch size gets its own execution context, static input and
    output buffers, and graph; a call copies its inputs in, replays, and clones the output out.
    The sidecar is checked (checkpoint, GPU) unless meta, an already checked one, is passed."""

    def __init__(self, engine_path, cuda_graph=False, ckpt_path=None, ckpt=None, meta=None):
        if meta is None:
            meta = load_sidecar(engine_path)
            check_sidecar(meta, engine_path, ckpt_path, ckpt, gpu_name=current_gpu_name())
        trt = import_tensorrt()
        self.meta, self.name, self.cuda_graph = meta, "trt", cuda_graph
        self.device = torch.device("cuda")
        self.runtime = trt.Runtime(trt_logger(trt))        # must outlive the engine
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"TensorRT {trt.__version__} cannot load {engine_path} (built with another TensorRT "
                            f"version or GPU?); rebuild it with export.py on this machine")
        names = sorted(self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))
        if names != sorted(IO_NAMES):
            raise UserError(f"{engine_path} has I/O {names}, expected {sorted(IO_NAMES)}; rebuild it with export.py")
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in IO_NAMES}
        low, _, high = self.engine.get_tensor_profile_shape("x", 0)      # (min, opt, max) shapes of x
        self.meta = {**meta, "profile": {**meta.get("profile", {}), "min": low[0], "max": high[0]}}
        self.image_shape = tuple(high)[1:]                                # (C, H, W)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()                  # TensorRT syncs more on the default stream
        self.graphs = {}                                   # batch size -> (context, x, t, y, out, graph)

    def _bind(self, context, x, t, y):
        """Set shapes and addresses of the inputs, allocate and bind the output; returns it."""
        for name, v in (("x", x), ("t", t), ("y", y)):
            if not context.set_input_shape(name, tuple(v.shape)):
                check_profile(self.meta, v.shape[0])
                raise UserError(f"the engine refuses input {name} of shape {tuple(v.shape)}; rebuild it with export.py")
            context.set_tensor_address(name, v.data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape("out")), dtype=self.dtypes["out"], device=self.device)
        context.set_tensor_address("out", out.data_ptr())
        return out

    def _enqueue(self, context):
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def __call__(self, x, t, y):
        check_profile(self.meta, x.shape[0])
        x, t, y = (v.to(self.device, self.dtypes[n]).contiguous() for n, v in (("x", x), ("t", t), ("y", y)))
        if self.cuda_graph:
            return self._replay(x, t, y)
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)                      # inputs were written on the main stream
        out = self._bind(self.context, x, t, y)
        for v in (x, t, y, out):
            v.record_stream(self.stream)                   # keep the allocator from reusing them early
        self._enqueue(self.context)
        main.wait_stream(self.stream)
        return out.float()

    def _capture(self, n):
        """Record one engine call at batch n: warm up outside the capture (TensorRT initialises lazily on
        the first enqueue, which must not be recorded), then capture on the side stream."""
        context = self.engine.create_execution_context()
        shape = (n, *self.image_shape)
        sx = torch.zeros(shape, dtype=self.dtypes["x"], device=self.device)
        st = torch.zeros(n, dtype=self.dtypes["t"], device=self.device)
        sy = torch.zeros(n, dtype=self.dtypes["y"], device=self.device)
        sout = self._bind(context, sx, st, sy)
        self.stream.wait_stream(torch.cuda.current_stream())
        self._enqueue(context)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(context)
        except RuntimeError as e:      # e.g. an engine that syncs inside enqueue (weight streaming)
            print(f"warning: CUDA graph capture of the engine failed ({str(e)[:120]}); running without graphs")
            self.cuda_graph = False
            return None
        self.graphs[n] = (context, sx, st, sy, sout, graph)
        return self.graphs[n]

    def _replay(self, x, t, y):
        entry = self.graphs.get(x.shape[0]) or self._capture(x.shape[0])
        if entry is None:
            return self(x, t, y)
        _, sx, st, sy, sout, graph = entry
        sx.copy_(x)
        st.copy_(t)
        sy.copy_(y)
        graph.replay()
        return sout.float().clone()     # the next replay overwrites sout; callers may keep this one


# ----------------------------------------------------------------------------------------------
#                                   Choosing and timing a backend
# ----------------------------------------------------------------------------------------------

def available_backends():
    """The backends usable on this machine, fastest first."""
    found = [] if trt_unavailable_reason() else ["trt"]
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("ort")
    return found + ["torch"]


def make_backend(name, path, *, ckpt_path=None, device="cpu", cuda_graph=False, providers=None, meta=None,
                 use_ema=True):
    """name 'trt' -> TrtBackend(engine path), 'ort' -> OrtBackend(onnx path), 'torch' -> TorchBackend(ckpt path).
    ckpt_path, when given, must be the checkpoint the file was exported from; meta: an already checked sidecar."""
    if name == "trt":
        return TrtBackend(path, cuda_graph=cuda_graph, ckpt_path=ckpt_path, meta=meta)
    if name == "ort":
        return OrtBackend(path, providers=providers, ckpt_path=ckpt_path, meta=meta)
    if name == "torch":
        model, _, _, _ = model_from_checkpoint(path, device, use_ema=use_ema)
        return TorchBackend(model)
    raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


class Timed:
    """Wrap a model call and accumulate its wall time (synchronising CUDA, so the time is the GPU's too)."""

    def __init__(self, fn, device):
        self.fn, self.cuda = fn, torch.device(device).type == "cuda"
        self.calls, self.seconds = 0, 0.0

    def __call__(self, x, t, y):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.fn(x, t, y)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    @property
    def ms_per_call(self):
        return 1000 * self.seconds / max(self.calls, 1)
