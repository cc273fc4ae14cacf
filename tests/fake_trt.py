"""A fake TensorRT 11.4 and a fake CUDA, for testing infer_trt.TrtBackend and export.build_engine on a CPU.

TensorRT cannot be installed on our machines. These fakes follow the contracts of the real libraries, not
what our code happens to call, and fail where the real ones fail. Each contract names its source:
  [py]  NVIDIA/TensorRT python/src/infer/pyCore.cpp (the Python bindings: return values, keep_alive)
  [rt]  NVIDIA/TensorRT include/NvInferRuntime.h, [nv] include/NvInfer.h (the C++ API the bindings wrap)
  [pb]  pybind11: a None passed for a C++ reference parameter, or a non-integer for an integer, is an error
  [cu]  CUDA / torch.cuda: a graph replays the kernels it recorded, reading and writing the addresses they
        were recorded with; an error in a kernel is sticky (every later CUDA call in the process fails).
An engine that Builder builds from an ONNX file holds that graph, as a real plan holds the network and its
weights, and computes it in fp16 arithmetic: every node at the graph's types with fp16 results, through
export.fp16_graph (onnx's reference runtime), so its numbers carry the rounding a TensorRT fp16 engine
has. A hand-made plan (plan_bytes without a graph, for the binding and CUDA-graph tests) computes
out = 2 x + t per sample instead, which shows which memory was read and written. Either reads its inputs from
and writes its output to the host addresses bound to it, through activation memory that its execution context
owns. It computes on CPU tensors, which PyTorch aligns to 64 bytes where CUDA's caching allocator gives 512:
the 256-byte rule therefore also refuses some fresh CPU tensors, which on a GPU would be aligned anyway.
"""
import contextlib
import ctypes
import json
import operator
import os
import types
import weakref

import numpy as np
import torch

ALIGNMENT = 256                  # [rt] setTensorAddress: "The pointer must have at least 256-byte alignment."
PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
CACHE_MAGIC = b"FAKE-TRT-CACHE\n"
GPU = "Fake GPU"
DTYPES = {"float": (ctypes.c_float, np.float32), "int64": (ctypes.c_int64, np.int64)}


class CudaError(RuntimeError):
    """What torch raises for a failed CUDA call."""


# ----------------------------------------------------------------------------------------------
#                                           fake CUDA
# ----------------------------------------------------------------------------------------------

class FakeCuda:
    """torch.cuda's streams, graphs and record_stream, recording what is done to them in `events`.
    A capture follows torch.cuda.graph (torch/cuda/graphs.py): enter = synchronize, switch to the capture
    stream, capture_begin; exit = capture_end, which raises for an invalidated capture, and only then the
    switch back. [cu] During a capture, work enqueued on the capturing stream is recorded, not run; work on
    another stream runs at once; synchronizing the capturing stream is an error that invalidates the capture."""

    def __init__(self):
        self.events, self.capturing, self.broken, self.ids = [], None, None, iter(range(1, 1000))
        self.current = self.Stream(self, 0)

    def check(self):
        if self.broken:                  # [cu] sticky: nothing works after an illegal memory access
            raise CudaError(f"CUDA error: {self.broken}")

    def invalidate_capture(self, why):
        self.capturing.invalid = why
        raise CudaError(f"CUDA error: {why}")

    class Stream:
        def __init__(self, cuda, handle=None):
            self.cuda, self.cuda_stream = cuda, next(cuda.ids) if handle is None else handle

        def wait_stream(self, other):
            self.cuda.events.append(("wait", self.cuda_stream, other.cuda_stream))

        def synchronize(self):
            self.cuda.check()
            if self.cuda.capturing is not None and self.cuda.capturing.stream is self:
                self.cuda.invalidate_capture("operation not permitted when stream is capturing")
            self.cuda.events.append(("sync", self.cuda_stream))

    def install(self, monkeypatch):
        cuda = self

        class Graph:
            """[cu] replays the recorded kernels; each checks that the memory it was recorded with still exists."""

            def __init__(self):
                self.kernels, self.stream, self.invalid = [], None, None

            def replay(self):
                cuda.check()
                cuda.events.append(("replay",))
                for kernel in self.kernels:
                    kernel()

        class graph:
            def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
                self.graph, self.stream, self.mode = cuda_graph, stream, capture_error_mode

            def __enter__(self):
                cuda.check()
                cuda.events.append(("capture", self.stream.cuda_stream, self.mode))
                self.before, cuda.current = cuda.current, self.stream
                self.graph.stream, cuda.capturing = self.stream, self.graph

            def __exit__(self, *exc):
                cuda.capturing = None        # capture_end, then (only if it did not raise) the stream back
                if self.graph.invalid:
                    raise CudaError("CUDA error: operation failed due to a previous error during capture")
                cuda.current = self.before

        @contextlib.contextmanager
        def use_stream(s):
            before, cuda.current = cuda.current, s
            try:
                yield
            finally:
                cuda.current = before
        monkeypatch.setattr(torch.cuda, "Stream", lambda: FakeCuda.Stream(cuda))
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: cuda.current)
        monkeypatch.setattr(torch.cuda, "stream", use_stream)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: cuda.events.append(("record", s.cuda_stream)))


def integer(value, method, parameter):
    """[pb] an integer argument (int, numpy integer: anything with __index__), else the bindings' TypeError."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{method}(): incompatible function arguments ({parameter}: typing.SupportsInt)") from None


def host_array(address, dtype, n):
    ctype, _ = DTYPES[dtype]
    return np.ctypeslib.as_array((ctype * n).from_address(address))


# ----------------------------------------------------------------------------------------------
#                                  fake TensorRT: the runtime
# ----------------------------------------------------------------------------------------------

class IExecutionContext:
    def __init__(self, engine, cuda):
        self.engine = engine             # [py] create_execution_context has keep_alive<0, 1>: the context
        self.cuda = cuda                 # keeps its engine alive; the engine holds no reference to it.
        self.shapes, self.addresses = {}, {}
        # [rt] a context made with the default ExecutionContextAllocationStrategy::kSTATIC owns the device
        # memory of its activations: freed with the context.
        self.activations = np.zeros(int(np.prod(engine.profile["x"][2])), np.float32)
        self.number = engine.runtime.contexts_made
        engine.runtime.contexts_made += 1
        engine.runtime.made.append(weakref.ref(self))

    def set_input_shape(self, name, shape):
        """[rt] False "if the provided name does not map to an input tensor, or if some other error occurred":
        a dimension that disagrees with the network's ("Each dimension must agree with the network dimension
        unless the latter was -1") or lies outside the optimisation profile, which TensorRT reports as an error."""
        shape = tuple(int(d) for d in shape)
        self.cuda.events.append(("shape", self.number, name, shape))
        if name not in self.engine.inputs:
            return False
        network, (low, _, high) = self.engine.inputs[name]["shape"], self.engine.profile[name]
        if len(shape) != len(network) or any(n not in (-1, d) for n, d in zip(network, shape)):
            return False
        if not all(a <= d <= b for a, d, b in zip(low, shape, high)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory):
        """[rt] False for a name that is no input or output ("Return false if the provided name does not map to
        an input or output tensor"), and for an address below the "at least 256-byte alignment" it requires
        (setInputTensorAddress/setOutputTensorAddress, which take "the same constraints": "false if ... does
        not meet alignment requirements"); [pb] memory is an integer."""
        memory = integer(memory, "set_tensor_address", "memory")
        self.cuda.events.append(("address", self.number, name))
        if name not in self.engine.io or memory % ALIGNMENT:
            return False
        self.addresses[name] = memory
        return True

    def get_tensor_shape(self, name):
        """[rt] an output's shape follows from the input shapes; -1 where they are not all set yet."""
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.inputs[name]["shape"])
        batch = self.shapes["x"][0] if set(self.shapes) == set(self.engine.inputs) else -1
        return (batch, *self.engine.outputs[name]["shape"][1:])

    def execute_async_v3(self, stream_handle):
        """[rt] enqueueV3: False unless every input shape and every I/O address is set; an engine that
        streams weights "will become synchronous, and the graph will not be capturable": under capture it
        fails and invalidates the capture (trtexec, sampleInference.cpp, ends the capture and falls back)."""
        stream_handle = integer(stream_handle, "execute_async_v3", "stream_handle")
        graph = self.cuda.capturing
        capturing = graph is not None and graph.stream.cuda_stream == stream_handle
        self.cuda.events.append(("execute", self.number, stream_handle, capturing))
        if self.cuda.broken or set(self.shapes) != set(self.engine.inputs) or set(self.addresses) != set(self.engine.io):
            return False
        if capturing and self.engine.streams_weights:
            graph.invalid = "operation not permitted when stream is capturing"
            return False
        kernel = self._kernel()
        if capturing:
            graph.kernels.append(kernel)
        else:
            kernel()
        return True

    def _kernel(self):
        """The engine's kernels as a graph records them: fixed addresses and this context's activation memory.
        The kernel holds no reference to the context (a recorded graph does not keep TensorRT objects alive)."""
        context, cuda, graph = weakref.ref(self), self.cuda, self.engine.graph
        shape = self.shapes["x"]
        n, size = shape[0], int(np.prod(shape))
        out_size = int(np.prod(self.get_tensor_shape("out")))
        x, t, y, out = (self.addresses[name] for name in ("x", "t", "y", "out"))

        def run():
            alive = context()
            if alive is None:            # [cu] its activation memory was freed with the context
                cuda.broken = "an illegal memory access was encountered"
                cuda.check()
            scratch = alive.activations[:size].reshape(n, -1)
            scratch[:] = host_array(x, "float", size).reshape(n, -1)
            if graph is None:
                result = 2 * scratch + host_array(t, "int64", n)[:, None]
            else:
                inputs = (torch.from_numpy(scratch.reshape(shape)), torch.from_numpy(host_array(t, "int64", n)),
                          torch.from_numpy(host_array(y, "int64", n)))
                result = graph(*inputs).numpy()
            host_array(out, "float", out_size)[:] = result.reshape(-1)
        return run


class ICudaEngine:
    def __init__(self, runtime, plan, onnx_bytes=b""):
        self.runtime = runtime           # [py] deserialize_cuda_engine has keep_alive<0, 1>
        self.inputs, self.outputs, self.profile = plan["inputs"], plan["outputs"], plan["profile"]
        self.io = {**self.inputs, **self.outputs}
        self.streams_weights = plan.get("streams_weights", False)
        self.graph = None                # the network it was built from, computed in fp16
        if onnx_bytes:
            import onnx
            from export import fp16_graph
            self.graph = fp16_graph(onnx.load_from_string(onnx_bytes))

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, index):
        return list(self.io)[index]

    def get_tensor_dtype(self, name):
        return self.io[name]["dtype"]

    def get_tensor_profile_shape(self, name, profile_index):
        """[rt] the (min, opt, max) shapes of an input in a profile."""
        return [tuple(s) for s in self.profile[name]]

    def create_execution_context(self):
        """[py] may return None (e.g. no device memory for the activations): `fail_contexts` says when."""
        if self.runtime.fail_contexts:
            return None
        return IExecutionContext(self, self.runtime.cuda)


class Runtime:
    def __init__(self, logger, cuda=None, fail_contexts=False, driver_too_old=False):
        started(driver_too_old)
        self.logger, self.cuda, self.fail_contexts = logger, cuda, fail_contexts
        self.made, self.contexts_made = [], 0      # weak references to the contexts, for the tests only

    def deserialize_cuda_engine(self, serialized_engine):
        """[rt] None (and an error in the log) for bytes that are not an engine of this TensorRT."""
        blob = bytes(serialized_engine)
        if not blob.startswith(PLAN_MAGIC):
            return None
        header, _, onnx_bytes = blob[len(PLAN_MAGIC):].partition(b"\n")
        return ICudaEngine(self, json.loads(header), onnx_bytes)


def plan_bytes(chw=(1, 4, 4), batches=(1, 4, 8), streams_weights=False, out_chw=None, onnx_bytes=b""):
    """A serialized fake engine: x (N, C, H, W) float, t and y (N,) int64 -> out (N, C_out, H, W) float; with
    onnx_bytes, the graph it computes (else 2 x + t)."""
    low, opt, high = batches
    inputs = {"x": {"shape": [-1, *chw], "dtype": "float"}, "t": {"shape": [-1], "dtype": "int64"},
              "y": {"shape": [-1], "dtype": "int64"}}
    outputs = {"out": {"shape": [-1, *(out_chw or chw)], "dtype": "float"}}
    profile = {"x": [[b, *chw] for b in batches], "t": [[low], [opt], [high]], "y": [[low], [opt], [high]]}
    header = json.dumps({"inputs": inputs, "outputs": outputs, "profile": profile,
                         "streams_weights": streams_weights}).encode()
    return PLAN_MAGIC + header + b"\n" + onnx_bytes


# ----------------------------------------------------------------------------------------------
#                                  fake TensorRT: the builder
# ----------------------------------------------------------------------------------------------

class IHostMemory(bytes):
    """[py] supports the buffer protocol (written to a file as it is)."""

    @property
    def nbytes(self):
        return len(self)


class ITimingCache:
    def __init__(self, gpu):
        self.gpu = gpu

    def serialize(self):
        return IHostMemory(CACHE_MAGIC + json.dumps({"gpu": self.gpu}).encode())


class ParserError:
    def __init__(self, text):
        self.text = text

    def desc(self):
        return self.text


class INetworkDefinition:
    def __init__(self):
        self.inputs, self.outputs, self.onnx_bytes = {}, {}, b""


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]

    def parse_from_file(self, model):
        """[py] False, with the reasons in get_error(i), for a file that is missing or not ONNX."""
        import onnx
        if not os.path.isfile(model):
            self.errors.append(ParserError(f"Failed to open file: {model}"))
            return False
        try:
            graph = onnx.load(model).graph
        except Exception as e:
            self.errors.append(ParserError(f"Failed to parse ONNX model from file: {model} ({type(e).__name__})"))
            return False
        for values, table in ((graph.input, self.network.inputs), (graph.output, self.network.outputs)):
            for value in values:
                table[value.name] = [d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim]
        with open(model, "rb") as f:
            self.network.onnx_bytes = f.read()
        return True


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class IBuilderConfig:
    def __init__(self, builder):
        self.builder, self.profiles, self.cache, self.pools = builder, [], None, {}
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, pool_size):
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        """None for data it cannot read (createTimingCache's nullptr: trtexec checks for it, shared/utils/
        cacheUtils.cpp, and Polygraphy falls back to an empty cache, backend/trt/config.py); [nv] "Size 0 means
        create a new cache from scratch"."""
        blob = bytes(serialized_timing_cache)
        if not blob:
            return ITimingCache(self.builder.gpu)
        if not blob.startswith(CACHE_MAGIC):
            return None
        try:
            return ITimingCache(json.loads(blob[len(CACHE_MAGIC):])["gpu"])
        except (ValueError, KeyError):
            return None

    def set_timing_cache(self, cache, ignore_mismatch):
        """[nv] False for a cache made on another device unless ignore_mismatch; [pb] None is a TypeError."""
        if not isinstance(cache, ITimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments (cache: ITimingCache)")
        if cache.gpu != self.builder.gpu and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


NULLPTR = "pybind11::init(): factory function returned nullptr"


def started(driver_too_old):
    """[pb] pybind11 raises TypeError(NULLPTR) when a class's factory returns nullptr (detail/init.h), which
    TensorRT's Builder and Runtime factories do when they cannot initialise CUDA, e.g. on a driver older than
    the CUDA the wheel was built for (NVIDIA/TensorRT#2913)."""
    if driver_too_old:
        raise TypeError(NULLPTR)


class Builder:
    def __init__(self, logger, gpu=GPU, fail_build=False, driver_too_old=False):
        started(driver_too_old)
        self.logger, self.gpu, self.fail_build = logger, gpu, fail_build

    def create_network(self, flags=0):
        return INetworkDefinition()

    def create_builder_config(self):
        return IBuilderConfig(self)

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        """[py] None when the build fails: no network, a dynamic input without a profile, min > opt > max
        out of order, or (fail_build) anything else the log would explain."""
        if self.fail_build or not network.inputs or not config.profiles:
            return None
        profile = config.profiles[0].shapes
        for name, dims in network.inputs.items():
            if name not in profile:
                return None
            low, opt, high = profile[name]
            if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
                return None
        x, out = network.inputs["x"], network.outputs["out"]
        return IHostMemory(plan_bytes(tuple(x[1:]), tuple(s[0] for s in profile["x"]), out_chw=tuple(out[1:]),
                                      onnx_bytes=network.onnx_bytes))


# ----------------------------------------------------------------------------------------------
#                                      the module
# ----------------------------------------------------------------------------------------------

def fake_tensorrt(cuda=None, gpu=GPU, fail_build=False, fail_contexts=False, driver_too_old=False):
    """A module object with the names our code uses, made by the classes above."""
    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=WARNING):
            self.min_severity = min_severity
    runtimes = []

    def make_runtime(logger):
        runtimes.append(Runtime(logger, cuda, fail_contexts, driver_too_old))
        return runtimes[-1]
    return types.SimpleNamespace(
        __version__="11.4.0.106-fake", Logger=Logger, Runtime=make_runtime, runtimes=runtimes,
        Builder=lambda logger: Builder(logger, gpu, fail_build, driver_too_old), OnnxParser=OnnxParser,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        DataType=types.SimpleNamespace(FLOAT="float", HALF="half", INT64="int64", INT32="int32"))


# The real class each fake stands for, for the test that every fake name exists in TensorRT 11.4.
REAL_NAMES = {IExecutionContext: "IExecutionContext", ICudaEngine: "ICudaEngine", Runtime: "Runtime",
              IHostMemory: "IHostMemory", ITimingCache: "ITimingCache", ParserError: "ParserError",
              OnnxParser: "OnnxParser", IOptimizationProfile: "IOptimizationProfile",
              IBuilderConfig: "IBuilderConfig", Builder: "Builder"}
