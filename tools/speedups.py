"""
Ways to run the readable DiT faster, as wrappers around it, for bench.py to measure: the network in
dit.py stays the one source of truth, and every speed-up here is a flag around it (a cast copy,
autocast, torch.compile, a CUDA-graph capture), never a hand-fused second model. The ones the main
path uses live there: the low-precision copy in sample.py, CUDA graphs in infer_trt.py, the compiled training
step in train.py.

Every inference wrapper returns a model call

    f(x, t, y) -> out        x (N, C, H, W) float32, t (N,) int64, y (N,) int64, out float32

that diffusion.sample accepts like the model itself, so the sampling math stays in diffusion.py.
bench.py measures each against the baseline `eager_fn` (plain fp32 PyTorch, the way the official
DiT code runs); docs/results.md says which one wins where.

Read top to bottom:  the machine -> inference wrappers -> training -> FLOPs and peak -> measuring.
"""
import sys

if __name__ == "__main__":      # run by hand: say what this file is, before importing what it needs
    sys.exit(f"{sys.argv[0]}: a module of tools/bench.py (its backends), not a script; "
             f"run python tools/bench.py")

import contextlib
import ctypes
import importlib.metadata
import os
import platform
import statistics
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import train
from infer_trt import CudaGraphs
from sample import LowPrecision, TorchBackend
from support import has_fast_bf16


# ----------------------------------------------------------------------------------------------
#                                          The machine
# ----------------------------------------------------------------------------------------------

def cpu_flags():
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16():
    """True when the CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16 dot products); elsewhere
    oneDNN emulates bf16 through fp32 and it is slower than fp32 itself."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def default_low_precision(device):
    """The reduced precision worth using on this device, or None where fp32 is the fastest."""
    device = torch.device(device)
    if device.type == "cuda":
        # bf16 has fp32's exponent range (no overflow in the residual stream); fp16 where bf16 is emulated.
        return torch.bfloat16 if has_fast_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


# ----------------------------------------------------------------------------------------------
#                                      Inference wrappers
# ----------------------------------------------------------------------------------------------

def eager_fn(model):
    """The baseline: the model's own fp32 forward, no autograd bookkeeping, nothing else."""
    model.eval()

    @torch.no_grad()
    def fn(x, t, y):
        return model(x, t, y)
    return fn


def tf32_fn(model):
    """Eager fp32 with TF32 tensor-core matmuls (Ampere and later; 10-bit mantissa inputs, fp32 sums): what
    the official DiT scripts switch on. The setting is global, so it is set around each call only."""
    eager = eager_fn(model)

    def fn(x, t, y):
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return eager(x, t, y)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return fn


def low_precision_fn(model, dtype):
    """Eager forward of a dtype copy of the weights (sample.LowPrecision): fp32 in and out."""
    return TorchBackend(model, dtype)


def compiled_fn(model, dtype=None, mode=None, freezing=None):
    """torch.compile of the forward (of a dtype copy when dtype is given): Inductor fuses the elementwise
    work (LayerNorm, modulate, GELU, gates, residual adds) into a few kernels around the matmuls.

    freezing (default: on for CPU) folds the weights into the graph as constants, which lets Inductor
    pre-pack them for oneDNN's matmuls (mkldnn linear instead of addmm); the wrapper then no longer sees
    later changes to the weights, so build a new one after loading others. mode: None, "max-autotune",
    "reduce-overhead" (CUDA graphs inside torch.compile). Each new batch size compiles once, on its first
    call (dynamic=False: static shapes are fastest).
    """
    import torch._inductor.config as inductor_config
    model.eval()
    net = model if dtype in (None, torch.float32) else LowPrecision(model, dtype).model
    if freezing is None:
        freezing = next(net.parameters()).device.type == "cpu"
    compiled = torch.compile(net, mode=mode, dynamic=False)
    in_dtype = next(net.parameters()).dtype

    @torch.no_grad()
    def fn(x, t, y):
        # Compilation happens inside the call, so the setting is patched around every call: passed as
        # torch.compile(options={"freezing": True}) it is silently ignored (the graph keeps plain addmm).
        with inductor_config.patch(freezing=freezing):
            out = compiled(x.to(in_dtype), t, y).float()
        # reduce-overhead replays CUDA graphs whose output buffer the next call overwrites: keep a copy.
        return out.clone() if mode == "reduce-overhead" else out
    return fn


def ort_session_options(threads=None):
    """ONNX Runtime CPU settings to match torch's: every graph optimisation (fusions, constant folding),
    torch's thread count, and no spin-waiting where OpenMP is told to sleep (OMP_WAIT_POLICY=PASSIVE),
    which on a shared machine is what keeps a waiting thread from stealing the core of a working one."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def cuda_graph_fn(model, dtype=torch.float16):
    """The model call (of a dtype copy) recorded as a CUDA graph per batch size and replayed
    (infer_trt.CudaGraphs)."""
    if next(model.parameters()).device.type != "cuda":
        raise ValueError("cuda_graph_fn needs a model on a CUDA device")
    net = TorchBackend(model, dtype).net
    return CudaGraphs(lambda x, t, y: (lambda: net(x, t, y).float()))


# ----------------------------------------------------------------------------------------------
#                                           Training
# ----------------------------------------------------------------------------------------------

def training_fn(model, compile=True, amp_dtype=None):
    """The model call of train.py's loop (train.wrap: torch.compile with --compile, same math and
    label-dropout draws as eager), plus autocast in amp_dtype as --amp adds it: faster, but it changes the
    numerics."""
    net = train.wrap(model, compile, 1, next(model.parameters()).device)
    if amp_dtype in (None, torch.float32):
        return net
    device_type = next(model.parameters()).device.type

    def fn(x, t, y):
        with torch.autocast(device_type, dtype=amp_dtype):
            return net(x, t, y)
    return fn


# ----------------------------------------------------------------------------------------------
#                                       FLOPs and the peak
# ----------------------------------------------------------------------------------------------

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one (it would count attention as
# 0 FLOPs on a CPU): teach it, with torch's own formula.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def count_flops(model, batch_size=1, backward=False):
    """FLOPs of one network evaluation (forward, or forward + backward) at batch_size, counted by running
    it under torch's FlopCounterMode: matmuls, convolutions and attention (1 multiply-add = 2 FLOPs).
    Elementwise work (LayerNorm, GELU, modulation) is not counted; it is memory-bound, not FLOP-bound."""
    p = next(model.parameters())
    c = model.config
    x = torch.randn(batch_size, *c.image_shape, device=p.device, dtype=p.dtype)
    t = torch.zeros(batch_size, dtype=torch.long, device=p.device)
    y = torch.zeros(batch_size, dtype=torch.long, device=p.device)
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        if backward:
            model(x, t, y).sum().backward()
        else:
            with torch.no_grad():
                model(x, t, y)
    if backward:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure_matmul_peak(device, dtype=torch.float32, n=4096, repeats=5):
    """The device's attainable FLOP/s in dtype: the best of `repeats` timed n x n matmuls (2 n^3 FLOPs)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------------------------
#                                   Measuring (used by bench.py)
# ----------------------------------------------------------------------------------------------

def interleaved(runs, repeats, sync):
    """{name: run()} -> {name: [seconds]}: each repeat runs every row once, starting one row later each
    time."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            runs[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def spread(seconds, scale=1.0):
    """Median and [min, max] of a list of times, times scale."""
    return {"median": statistics.median(seconds) * scale, "min": min(seconds) * scale,
            "max": max(seconds) * scale}


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator counter on a GPU; on a CPU, the process's resident
    size sampled every millisecond (after malloc_trim gave freed memory back), so only roughly."""

    def __init__(self, device):
        self.cuda, self.peak = device.type == "cuda", 0

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self.done:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.001)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base, self.done = self._rss(), False
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.done = True
            self.thread.join()


def machine_info(device):
    """The CPU, GPU and library versions the numbers were measured with."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    flags = cpu_flags()
    versions = {"torch": torch.__version__}
    for package in ("onnxruntime", "tensorrt"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16": sorted(flags & {"amx_bf16", "avx512_bf16"}) or "none",
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "versions": versions, "load_average_start": os.getloadavg()[0]}


def machine_line(device):
    """machine_info in words, for the reports of evaluate.py."""
    m = machine_info(torch.device(device))
    return (f"{m['cores']}-core CPU ({m['cpu']}), {m['gpu'] or 'no GPU'}, torch {m['versions']['torch']}, "
            f"threads: {m['torch_threads']}")
