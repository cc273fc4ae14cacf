"""
Sample digits from an exported model: a TensorRT engine, an ONNX file in ONNX Runtime, or (for
comparison) the PyTorch checkpoint, through diffusion.py's samplers, the same ones sample.py uses.

    python infer_trt.py --engine runs/mnist/model_fp16.engine --labels "7 seven 3" --out digits.png
    python infer_trt.py --onnx runs/mnist/model.onnx --backend ort --cfg-scale 2
    python infer_trt.py --engine runs/mnist/model_fp16.engine --compare      # vs PyTorch: pixels and ms/step

The files written by export.py are enough: the model and diffusion configs and the class names come
from the file's sidecar (`<file>.json`). --ckpt is needed only for --backend torch and --compare (when
the sidecar's checkpoint path no longer exists); when given it must be the checkpoint the file was
exported from, or the run stops with the command that fixes it. With no --engine, --onnx or --ckpt:
the shipped model, through the files `python export.py` wrote for it in runs/shipped/ if they exist.

Backend (default: the fastest available): trt (TensorRT + CUDA GPU), else ort, else torch. A missing
file for the chosen backend is looked up next to the others: model_fp16.engine, model.onnx. Each backend
is a callable out = f(x, t, y) (x float32 (N, C, H, W), t and y int64 (N,), out float32 (N, C_out, H, W) on
f.device), so diffusion.py's samplers run unchanged on it. A file written by export.py is refused when its
sidecar (`<file>.json`) disagrees with the file, the checkpoint or the GPU: a stale engine would otherwise
sample wrong images without any error.

Read top to bottom: the flags -> ONNX Runtime -> CUDA graphs -> the TensorRT runtime (deserialize, an
execution context, input shapes and tensor addresses, execute_async_v3, a CUDA graph per batch size) ->
choosing a backend -> main, the sampling-loop call with its --compare against PyTorch.
"""
import contextlib
import importlib.util
import math
import os
import sys
import time

from support import (ENGINE_NAME, ONNX_NAME, SHIPPED_EXPORT_DIR, ArgumentParser, UserError, add_sampling_args,
                     check_sampling_args, run_cli)

BACKENDS = ("trt", "ort", "torch")                    # fastest first


def infer_parser():
    p = ArgumentParser(description="Sample a labelled PNG grid on a TensorRT engine / ONNX Runtime / "
                                   "PyTorch.")
    a = p.add_argument
    a("--engine", default=None, help=f"TensorRT engine from export.py ({ENGINE_NAME})")
    a("--onnx", default=None, help=f"ONNX file from export.py (None: {ONNX_NAME} beside the engine)")
    a("--ckpt", default=None, help="the checkpoint: for --backend torch and --compare; checked against the "
      "sidecar")
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="auto = the fastest available")
    a("--cuda-graph", action="store_true", help="trt: replay each batch size as one CUDA graph")
    a("--compare", action="store_true", help="also run PyTorch from the same noise; print pixel difference "
      "and ms/step")
    add_sampling_args(p, default_out="runs/samples_infer.png")    # the flags and defaults of sample.py
    return p


def parse_args(argv):
    return check_sampling_args(infer_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: parse_args(sys.argv[1:]))   # --help answers before torch loads

# ruff: noqa: E402
# PyTorch and the modules that use it load only here, after the flags.
import numpy as np
import torch

from diffusion import GaussianDiffusion
from sample import (TorchBackend, class_names_of, configs_from_checkpoint, draw_labelled, label_table_path,
                    model_from_checkpoint, pixel_difference, save_labelled_grid)
from support import (check_sidecar, check_writable, checkpoint_or_shipped, first_line, image_format,
                     load_sidecar, pick_device, refuse_overwrite, sampling_values)

IO_NAMES = ("x", "t", "y", "out")       # the ONNX/engine contract: inputs x, t, y; output out


# ----------------------------------------------------------------------------------------------
#                                         ONNX Runtime
# ----------------------------------------------------------------------------------------------


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32}


class OrtBackend:
    """An ONNX file in ONNX Runtime; numpy I/O converted from/to torch. CUDA EP when available.
    The sidecar is checked (against ckpt_path when given) unless meta, an already checked one, is passed."""

    def __init__(self, onnx_path, providers=None, ckpt_path=None, meta=None, session_options=None):
        import onnxruntime as ort
        if meta is None:
            meta = load_sidecar(onnx_path)
            check_sidecar(meta, onnx_path, ckpt_path)
        self.meta, self.device = meta, torch.device("cpu")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(os.fspath(onnx_path), sess_options=session_options,
                                                providers=providers)
        except Exception as e:
            raise UserError(f"ONNX Runtime cannot load {onnx_path} ({first_line(e)}); "
                            f"rerun export.py") from None
        names = [i.name for i in self.session.get_inputs()] + [o.name for o in self.session.get_outputs()]
        if names != list(IO_NAMES):
            raise UserError(f"{onnx_path} has I/O {names}, expected {list(IO_NAMES)}; "
                            f"export it with export.py")
        self.input_types = {i.name: _NUMPY_TYPES[i.type] for i in self.session.get_inputs()}
        self.providers = self.session.get_providers()

    def __call__(self, x, t, y):
        feeds = {name: v.detach().cpu().numpy().astype(self.input_types[name], copy=False)
                 for name, v in (("x", x), ("t", t), ("y", y))}
        out = self.session.run(["out"], feeds)[0]
        return torch.from_numpy(out).float().to(x.device)


# ----------------------------------------------------------------------------------------------
#                                         CUDA graphs
# ----------------------------------------------------------------------------------------------


# TensorRT requires every bound address to be 256-byte aligned (setTensorAddress, NvInferRuntime.h).
TRT_ALIGNMENT = 256


def empty_aligned(shape, dtype, device, alignment=TRT_ALIGNMENT):
    """An uninitialised tensor whose data starts on an `alignment`-byte boundary: a view into a slightly
    larger buffer (the view keeps the buffer alive)."""
    numel, size = math.prod(shape), dtype.itemsize
    buffer = torch.empty(numel + alignment // size, dtype=dtype, device=device)
    offset = (-buffer.data_ptr() % alignment) // size        # a whole number: data_ptr is a multiple of size
    return buffer[offset:offset + numel].view(shape)


def aligned(v, alignment=TRT_ALIGNMENT):
    """v itself when it is contiguous and starts on an `alignment`-byte boundary, else an aligned copy.
    A contiguous view at an offset (y[8:16], x[1:]) starts wherever its offset puts it."""
    if v.is_contiguous() and v.data_ptr() % alignment == 0:
        return v
    return empty_aligned(v.shape, v.dtype, v.device, alignment).copy_(v)


class CaptureFailed(RuntimeError):
    """Recording a CUDA graph failed; nothing was replayed, so the caller may go on without graphs."""


class CudaGraphs:
    """A model call recorded once per input shape as a CUDA graph and replayed: one launch per network
    evaluation instead of one per kernel, which is what limits a small DiT at small batch on a GPU.

    A graph reads and writes fixed addresses, so each shape gets static input buffers: a call copies
    x, t, y into them, replays, and returns a clone of the static output (the next replay overwrites it).
    prepare(x, t, y) gets those buffers and returns `run`, a zero-argument function that computes the
    output from them and returns it; `run` is called `warmup` times, then once under capture. `run` is
    kept as long as its graph: whatever it holds (a TensorRT execution context and the device memory it
    owns) is what the recorded kernels read and write, and freeing it would make every replay a
    use-after-free on the GPU. capture_error_mode: torch.cuda.graph's ("global", "thread_local", "relaxed").
    """

    def __init__(self, prepare, stream=None, warmup=3, capture_error_mode="global"):
        self.prepare, self.stream, self.warmup = prepare, stream, warmup
        self.capture_error_mode = capture_error_mode
        self.graphs = {}                     # input shapes -> (graph, static inputs, static output, run)

    @torch.no_grad()
    def _capture(self, x, t, y):
        static = tuple(empty_aligned(v.shape, v.dtype, v.device).copy_(v) for v in (x, t, y))
        run = self.prepare(*static)
        # Warm up outside the capture so one-time work (cuBLAS handles, kernel selection, lazy
        # allocations, TensorRT's set-up on its first enqueue) is not recorded.
        stream = self.stream or torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                run()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            # torch.cuda.graph ends the capture before it switches the stream back, and skips the switch when
            # ending fails (an invalidated capture): the outer `with` restores the caller's stream either way.
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream,
                                                             capture_error_mode=self.capture_error_mode):
                out = run()
        except RuntimeError as e:
            raise CaptureFailed(first_line(e)) from e
        return graph, static, out, run

    @torch.no_grad()
    def __call__(self, x, t, y):
        key = (tuple(x.shape), tuple(t.shape), tuple(y.shape))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, y)
        graph, static, out, _ = self.graphs[key]
        for buffer, value in zip(static, (x, t, y)):
            buffer.copy_(value)
        # A fault inside a replayed kernel is asynchronous: it surfaces at a later launch or synchronisation,
        # and CUDA errors are sticky, so one seen here ends any further use of the GPU in this process.
        try:
            graph.replay()
        except RuntimeError as e:
            raise UserError(f"replaying a CUDA graph failed ({first_line(e)}); "
                            f"this process cannot use the GPU any more: rerun without --cuda-graph") from None
        return out.clone()


# ----------------------------------------------------------------------------------------------
#                                     The TensorRT runtime
# ----------------------------------------------------------------------------------------------


TRT_MISSING = "TensorRT is not installed (pip install -r requirements-gpu.txt on a CUDA machine)"


def trt_unavailable_reason():
    """None when TensorRT can be used here, else why not. TensorRT is imported only where a CUDA device
    exists (its calls can crash the process without one). A package that is found but does not import
    (e.g. the bindings wheel without its libraries wheel), or that imports but cannot start on this CUDA
    driver (a trial Runtime), counts as unavailable."""
    if importlib.util.find_spec("tensorrt") is None:
        return TRT_MISSING
    if not torch.cuda.is_available():
        return "no CUDA GPU is available, and TensorRT needs one"
    try:
        import tensorrt as trt
    except Exception as e:   # ImportError, or OSError from a library the bindings load
        return (f"TensorRT is installed but does not import ({first_line(e)}); reinstall it from "
                f"requirements-gpu.txt")
    try:
        with starting_tensorrt(trt):
            trt.Runtime(trt_logger(trt))
    except UserError as e:
        return str(e)
    return None


@contextlib.contextmanager
def starting_tensorrt(trt):
    """Around trt.Runtime(...) or trt.Builder(...). Where TensorRT cannot initialise CUDA (a driver older than
    the CUDA its wheel was built for: tensorrt-cu13 needs R580 or newer), the bindings' factory returns
    nullptr and pybind11 raises TypeError "pybind11::init(): factory function returned nullptr"
    (NVIDIA/TensorRT#2913): that becomes one line naming the mismatch."""
    try:
        yield
    except TypeError as e:
        if "nullptr" not in str(e):
            raise
        raise UserError(f"TensorRT {trt.__version__} cannot start on this machine's CUDA driver, which "
                        f"PyTorch (CUDA {torch.version.cuda}) can use ({first_line(e)}): update the NVIDIA "
                        f"driver (tensorrt-cu13 needs R580 or newer) or install tensorrt-cu12==11.4.* for a "
                        f"CUDA 12 driver") from None


def import_tensorrt():
    """The tensorrt module, only where a CUDA device exists and it imports; otherwise a one-line UserError."""
    reason = trt_unavailable_reason()
    if reason:
        raise UserError(f"{reason}; use --backend ort")
    import tensorrt as trt
    return trt


def current_gpu_name(device="cuda"):
    """Name of a CUDA device, or None without a GPU (engines are tied to the GPU they were built on)."""
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else None


def check_profile(meta, batch, artifact="the engine"):
    """An engine runs only batch sizes inside the optimisation profile it was built with."""
    bounds = meta.get("profile")
    if bounds and not bounds["min"] <= batch <= bounds["max"]:
        raise UserError(f"batch {batch} is outside the engine's profile [{bounds['min']}, {bounds['max']}] "
                        f"({artifact}); rebuild with export.py --max-batch {max(batch, bounds['max'])}")


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

    cuda_graph=True replays each batch size as one CUDA graph (CudaGraphs): the sampler repeats the same
    call 10-1000 times, so one graph launch replaces TensorRT's per-call kernel launches. A graph bakes in
    every address and shape, so each batch size gets its own execution context bound to its buffers, kept
    alive with its graph (the context owns the activation memory the graph writes). Every bound address is
    256-byte aligned, as TensorRT requires. The sidecar is checked (checkpoint, GPU) unless meta, an already
    checked one, is passed. TensorRT works on the current CUDA device, so everything of the engine is made
    with `device` current."""

    def __init__(self, engine_path, cuda_graph=False, ckpt_path=None, meta=None, device="cuda"):
        self.device = torch.device(device)
        if meta is None:
            meta = load_sidecar(engine_path)
            gpu = current_gpu_name(self.device) if self.device.type == "cuda" else None
            check_sidecar(meta, engine_path, ckpt_path, gpu_name=gpu)
        if self.device.type != "cuda":
            raise UserError(f"TensorRT runs on a CUDA GPU, not on {self.device}; "
                            f"pass --device cuda or cuda:N")
        trt = import_tensorrt()
        with starting_tensorrt(trt):
            self.runtime = trt.Runtime(trt_logger(trt))    # must outlive the engine
        with open(engine_path, "rb") as f, torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"TensorRT {trt.__version__} cannot load {engine_path} (built with another "
                            f"TensorRT version or GPU?); rebuild it with export.py on this machine")
        names = sorted(self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))
        if names != sorted(IO_NAMES):
            raise UserError(f"{engine_path} has I/O {names}, expected {sorted(IO_NAMES)}; "
                            f"rebuild it with export.py")
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in IO_NAMES}
        low, _, high = self.engine.get_tensor_profile_shape("x", 0)      # (min, opt, max) shapes of x
        self.meta = {**meta, "profile": {**meta.get("profile", {}), "min": low[0], "max": high[0]}}
        with torch.cuda.device(self.device):
            self.context = self._new_context()
            self.stream = torch.cuda.Stream()              # TensorRT syncs more on the default stream
        # Captured in thread-local mode, as trtexec does (samples/common/sampleDevice.h): only this thread's
        # unsafe CUDA calls can invalidate the capture, not another thread's.
        self.graphs = None
        if cuda_graph:
            self.graphs = CudaGraphs(self._prepare_graph, stream=self.stream, warmup=1,
                                     capture_error_mode="thread_local")

    def _new_context(self):
        context = self.engine.create_execution_context()
        if context is None:              # e.g. no device memory left for its activations
            raise UserError("TensorRT could not create an execution context (out of GPU memory? "
                            "see its log above)")
        return context

    def _bind(self, context, x, t, y):
        """Set shapes and addresses of the inputs (256-byte aligned), allocate and bind the output;
        returns it."""
        for name, v in (("x", x), ("t", t), ("y", y)):
            if not context.set_input_shape(name, tuple(v.shape)):
                check_profile(self.meta, v.shape[0])
                raise UserError(f"the engine refuses input {name} of shape {tuple(v.shape)}; "
                                f"rebuild it with export.py")
            self._set_address(context, name, v)
        out = empty_aligned(tuple(context.get_tensor_shape("out")), self.dtypes["out"], self.device)
        self._set_address(context, "out", out)
        return out

    @staticmethod
    def _set_address(context, name, v):
        if not context.set_tensor_address(name, v.data_ptr()):
            raise UserError(f"TensorRT refused the address of {name} "
                            f"(0x{v.data_ptr():x}: it needs device memory aligned to {TRT_ALIGNMENT} bytes)")

    def _enqueue(self, context):
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _prepare_graph(self, x, t, y):
        """For CudaGraphs: a new execution context bound to this batch size's static buffers. The returned
        `run` holds the context, and CudaGraphs keeps `run` as long as the graph recorded from it."""
        with torch.cuda.device(self.device):
            context = self._new_context()
        out = self._bind(context, x, t, y)

        def run():
            self._enqueue(context)
            return out
        return run

    def __call__(self, x, t, y):
        check_profile(self.meta, x.shape[0])
        x, t, y = (v.to(self.device, self.dtypes[n]) for n, v in (("x", x), ("t", t), ("y", y)))
        with torch.cuda.device(self.device):
            return self._call(x, t, y)

    def _call(self, x, t, y):
        if self.graphs is not None:
            try:
                return self.graphs(x, t, y).float()
            except CaptureFailed as e:      # e.g. an engine that syncs inside enqueue (weight streaming)
                print(f"warning: CUDA graph capture of the engine failed ({e}); running without graphs",
                      file=sys.stderr)
                self.graphs = None
        x, t, y = (aligned(v) for v in (x, t, y))          # bound as they are: contiguous, 256-byte aligned
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)                      # inputs were written on the main stream
        out = self._bind(self.context, x, t, y)
        for v in (x, t, y, out):
            v.record_stream(self.stream)                   # keep the allocator from reusing them early
        self._enqueue(self.context)
        main.wait_stream(self.stream)
        return out.float()


# ----------------------------------------------------------------------------------------------
#                                      Choosing a backend
# ----------------------------------------------------------------------------------------------


def open_backend(name, path, *, ckpt_path=None, device="cpu", cuda_graph=False):
    """name 'trt' -> TrtBackend(engine path), 'ort' -> OrtBackend(onnx path), 'torch' -> TorchBackend(ckpt
    path, EMA weights). ckpt_path, when given, must be the checkpoint the file was exported from (its
    sidecar is checked). The backend's .meta (sidecar or checkpoint) holds the configs and class names."""
    if name == "trt":
        return TrtBackend(path, cuda_graph=cuda_graph, ckpt_path=ckpt_path, device=device)
    if name == "ort":
        return OrtBackend(path, ckpt_path=ckpt_path)
    if name == "torch":
        model, _, _, ckpt = model_from_checkpoint(path, device)
        return TorchBackend(model, meta=ckpt)
    raise UserError(f"unknown backend {name!r}; choose trt, ort or torch")


def check_file(flag, path):
    """An --engine, --onnx or --ckpt that exists, is a file, and is not plainly another kind of file."""
    if path is None:
        return
    if not os.path.exists(path):
        raise UserError(f"{flag} {path} does not exist; export.py writes the engine and the ONNX files")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder, not a file; pass the file export.py wrote in it")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} is not a regular file; pass the file export.py wrote")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"     # torch.save writes a zip archive
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be read ({e.strerror}); check its permissions") from None
    if flag != "--ckpt" and zipped:
        raise UserError(f"{flag} {path} is a PyTorch checkpoint, not an exported file; pass it as --ckpt, "
                        f"or the file `python export.py --ckpt {path}` writes")
    if flag == "--engine" and path.endswith(".onnx"):
        raise UserError(f"--engine {path} is an ONNX file; pass it as --onnx (TensorRT runs the .engine "
                        f"built from it)")


def choose_backend(args):
    """The backend to run and its file: --backend, or the fastest one whose file and runtime are here."""
    given = args.engine or args.onnx or args.ckpt
    if given is None:                # the shipped model, and the files `python export.py` made from it
        args.ckpt = checkpoint_or_shipped(None)
        given = os.path.join(SHIPPED_EXPORT_DIR, ONNX_NAME)
        if not os.path.isfile(given):
            print(f"note: no {given} in {os.getcwd()} (python export.py writes it into the working folder): "
                  f"without TensorRT, the shipped model runs in PyTorch", file=sys.stderr)
    for flag, path in (("--engine", args.engine), ("--onnx", args.onnx), ("--ckpt", args.ckpt)):
        check_file(flag, path)
    folder = os.path.dirname(os.path.abspath(given))
    engine = args.engine or os.path.join(folder, ENGINE_NAME)
    onnx_path = args.onnx or os.path.join(folder, ONNX_NAME)
    backend = args.backend
    # Only trt and auto look for TensorRT (importing it where a GPU exists).
    no_trt = trt_unavailable_reason() if backend in ("trt", "auto") else None
    if backend == "trt" and no_trt:
        raise UserError(f"{no_trt}; use --backend ort")
    if backend == "torch" and not args.ckpt:
        raise UserError("--backend torch needs --ckpt RUN/ckpt.pt")
    if args.cuda_graph and backend in ("ort", "torch"):
        raise UserError(f"--cuda-graph replays a TensorRT engine; --backend {backend} has no CUDA graphs: "
                        f"drop --cuda-graph, or run the engine (--backend trt)")
    if backend == "auto":
        backend = ("trt" if not no_trt and os.path.isfile(engine) else "ort" if os.path.isfile(onnx_path)
                   else "torch" if args.ckpt else None)
        if backend is None and args.engine:
            raise UserError(f"--engine {args.engine} needs TensorRT, and {no_trt}; run the ONNX file "
                            f"export.py wrote beside it instead (--onnx)")
        if backend is None:
            raise UserError(f"nothing to run: {onnx_path} does not exist and the engine needs TensorRT "
                            f"({no_trt or 'the engine file is missing'}); pass --onnx or --ckpt")
        if args.engine and backend != "trt":
            print(f"note: not using the engine ({no_trt}); backend {backend}", file=sys.stderr)
        if args.cuda_graph and backend != "trt":
            print(f"note: --cuda-graph has no effect: backend {backend} runs without CUDA graphs",
                  file=sys.stderr)
    return backend, {"trt": engine, "ort": onnx_path, "torch": args.ckpt}[backend]


def checkpoint_for(args, meta, artifact):
    """The checkpoint for --compare: --ckpt (already checked against the sidecar), or the one the sidecar
    names, if it still exists and is still the file the export was made from."""
    path = args.ckpt or meta.get("checkpoint", {}).get("path")
    if not path or not os.path.isfile(path):
        raise UserError("--compare needs the checkpoint; pass --ckpt RUN/ckpt.pt"
                        + (f" (the sidecar's {path} does not exist)" if path else ""))
    if args.ckpt is None:
        check_sidecar(meta, artifact, ckpt_path=path)
    return path


# ----------------------------------------------------------------------------------------------
#                    main: the sampling loop on the backend, and --compare
# ----------------------------------------------------------------------------------------------


# --compare's verdict: the largest pixel difference (of 255 grey levels) allowed against PyTorch fp32. An fp32
# graph computes what PyTorch does up to rounding; the fp16 ones (engine, model_fp16.onnx) round to fp16.
PIXEL_TOLERANCE = {"fp32": 1.0, "fp16": 8.0}
# A reference network whose outputs all stay below this is untrained, and any comparison with it passes.
NEAR_ZERO = 1e-3


class Timed:
    """Wrap a model call and time each call (synchronising CUDA, so the time is the GPU's too). The first call
    of each input shape carries one-time work (a CUDA graph's capture and warm-up, allocations, kernel
    selection), so the steady state and the one-time cost are reported apart."""

    def __init__(self, fn, device):
        self.fn, self.cuda = fn, torch.device(device).type == "cuda"
        self.first, self.later, self.max_abs = {}, [], 0.0     # seconds: first call per shape, every other

    def __call__(self, x, t, y):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.fn(x, t, y)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if tuple(x.shape) in self.first:
            self.later.append(seconds)
        else:
            self.first[tuple(x.shape)] = seconds
        self.max_abs = max(self.max_abs, out.abs().max().item())
        return out

    @property
    def ms_per_call(self):
        """The steady state: the median call after each shape's first (the first calls if there are no
        others)."""
        calls = sorted(self.later or self.first.values()) or [0.0]
        return 1000 * calls[len(calls) // 2]

    @property
    def ms_once(self):
        """What the first calls cost beyond the steady state, over all input shapes."""
        return max(1000 * sum(self.first.values()) - len(self.first) * self.ms_per_call, 0.0)


def run_sampler(fn, diffusion, model_config, class_names, sampling):
    """All images, drawn as sample.py draws them (sample.draw_labelled with the sampling flags' values), the
    labels, the seconds it took and the timed model call (ms per call, largest output)."""
    timed = Timed(fn, fn.device)
    start = time.perf_counter()
    images, labels = draw_labelled(timed, diffusion, model_config, class_names, fn.device, **sampling)
    return images, labels, time.perf_counter() - start, timed


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend, path = choose_backend(args)
    refuse_overwrite({"--out": args.out, "--out's label table": label_table_path(args.out)},
                     {"--engine": args.engine, "--onnx": args.onnx, "--ckpt": args.ckpt,
                      f"the {backend} file": path})
    image_format(args.out)
    fn = open_backend(backend, path, ckpt_path=args.ckpt, device=pick_device(args.device),
                      cuda_graph=args.cuda_graph)
    # The checkpoint of --compare is found before the sampling; the configs come from the sidecar (checked)
    # or the checkpoint.
    compare_ckpt = checkpoint_for(args, fn.meta, path) if args.compare else None
    model_config, diffusion_config = configs_from_checkpoint(fn.meta, path)
    diffusion = GaussianDiffusion(diffusion_config)
    class_names = class_names_of(fn.meta, model_config)

    sampling = sampling_values(args)
    images, labels, seconds, timed = run_sampler(fn, diffusion, model_config, class_names, sampling)
    save_labelled_grid(images, labels, class_names, args.out, args.nrow, args.cfg_scale)
    detail = f" ({', '.join(fn.providers)})" if backend == "ort" else f" on {fn.device}"
    once = "warm-up and graph capture" if args.cuda_graph else "warm-up"
    print(f"{backend}{detail}: {len(labels)} images, {args.sampler} {args.steps} steps, "
          f"CFG {args.cfg_scale}, seed {args.seed}, {seconds:.2f} s: {timed.ms_per_call:.2f} ms per network "
          f"call, plus {timed.ms_once:.0f} ms once (first calls: {once}) -> {args.out}")

    if args.compare:
        weights = fn.meta.get("checkpoint", {}).get("weights", "ema")
        model, _, _, _ = model_from_checkpoint(compare_ckpt, pick_device(args.device),
                                               use_ema=weights == "ema")
        ref_images, _, ref_seconds, ref = run_sampler(TorchBackend(model), diffusion, model_config,
                                                      class_names, sampling)
        diff, tolerance = (pixel_difference(images, ref_images),
                           PIXEL_TOLERANCE[fn.meta.get("precision", "fp32")])
        verdict = "PASS" if diff["float"] <= tolerance else "FAIL"
        speedup = ref.ms_per_call / max(timed.ms_per_call, 1e-9)
        print(f"torch on {next(model.parameters()).device} ({weights} weights of {compare_ckpt}): "
              f"{ref_seconds:.2f} s: {ref.ms_per_call:.2f} ms per network call, "
              f"plus {ref.ms_once:.0f} ms once")
        print(f"largest pixel difference {backend} vs torch: {diff['float']:.3f} / 255 "
              f"(uint8: {diff['uint8']}), tolerance {tolerance:g} / 255: {verdict}; "
              f"speed-up {speedup:.2f}x per call (steady state)")
        if ref.max_abs < NEAR_ZERO:
            print(f"warning: the PyTorch network's outputs stay below {NEAR_ZERO:g} "
                  f"(largest {ref.max_abs:.2g}): "
                  f"an untrained model, so this comparison shows nothing", file=sys.stderr)
        if verdict == "FAIL":
            sys.exit(1)


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --batch-size or --num-samples")
