"""
Export a trained DiT for deployment: ONNX (fp32 and fp16), checked against PyTorch in ONNX Runtime,
then a TensorRT 11 fp16 engine when TensorRT and a CUDA GPU are present.

    python export.py                                           # the shipped model -> runs/shipped/
    python export.py --ckpt runs/mnist/ckpt.pt                 # files go next to the checkpoint
    python export.py --ckpt runs/mnist/ckpt.pt --out-dir deploy --batch-size 64 --max-batch 256

Writes, each with a JSON sidecar `<file>.json` (checkpoint SHA-256, configs, class names, versions, checks):
    model.onnx             fp32 graph                    -> infer_trt.py --backend ort
    model_fp16.onnx        fp16 weights and matmuls, fp32 I/O, LayerNorm statistics and the timestep
                           sin/cos in fp32                -> the TensorRT engine's source
    model_fp16.engine      TensorRT engine (GPU + TensorRT only) -> infer_trt.py --backend trt
    model_fp16.timing.cache  TensorRT's measured kernel timings: makes the next build fast

Graph I/O: x float32 (N, C, H, W), t int64 (N,), y int64 (N,) -> out float32 (N, C_out, H, W), the
network's raw prediction (eps, x0 or v per the checkpoint's diffusion_config.prediction, then the
variance channels when learn_sigma). N is dynamic. TensorRT 11 has no fp16 builder flag: precision
comes from the ONNX types alone (strongly typed), hence the separate fp16 graph.

Read top to bottom, as an export runs: 1. trace to ONNX -> 2. check against PyTorch (parity, fp16 where it
is really computed, a fixed-seed sampling run) -> 3. build the TensorRT engine -> main, which writes each file
only once its checks pass. The runtime that calls the engine is infer_trt.py's.
"""
import collections
import contextlib
import copy
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings

from support import (DEFAULT_BATCH_SIZE, SHIPPED_EXPORT_DIR, ArgumentParser, UserError, nonnegative_int,
                     positive_int, run_cli)

OPSETS = (20, 21, 22, 23)
EXPERIMENTAL_OPSET = 23  # its ONNX Attention nodes are new to TensorRT's ONNX importer


def export_parser():
    p = ArgumentParser(description="Export a DiT checkpoint to ONNX and a TensorRT fp16 engine.")
    a = p.add_argument
    a("--ckpt", default=None, help="checkpoint written by train.py (None: the shipped model, "
      "checkpoints/dit-t4-mnist.pt)")
    a("--out-dir", default=None, help="folder for the files (None: the checkpoint's folder; "
      f"{SHIPPED_EXPORT_DIR} for the shipped model)")
    a("--weights", choices=("ema", "model"), default="ema", help="the EMA or the raw trained weights")
    a("--opset", type=int, default=20, choices=OPSETS, help=f"ONNX opset; {EXPERIMENTAL_OPSET} is "
      "experimental (ONNX Attention nodes, new in TensorRT's importer)")
    a("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="the sampling batch the engine is "
      "tuned for (sample.py's and infer_trt.py's default); the profile's opt is 2x: guidance doubles it")
    a("--max-batch", type=positive_int, default=256, help="largest engine batch (at least 2x --batch-size)")
    a("--opt-level", type=int, default=3, choices=range(6), help="TensorRT builder optimisation level")
    a("--workspace-gb", type=positive_int, default=4, help="TensorRT builder workspace limit")
    a("--verify-steps", type=positive_int, default=10, help="DDIM steps of the fixed-seed comparison")
    a("--seed", type=nonnegative_int, default=0, help="seed of the check inputs")
    a("--device", default=None, help="where PyTorch runs the checks: cpu, cuda, cuda:N (None: cuda if "
      "available)")
    return p


def parse_args(argv):
    args = export_parser().parse_args(argv)
    if 2 * args.batch_size > args.max_batch:
        raise UserError(f"--max-batch {args.max_batch} must be at least 2 x --batch-size = "
                        f"{2 * args.batch_size} (classifier-free guidance runs a doubled batch)")
    return args


if __name__ == "__main__":
    run_cli(lambda: parse_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads

# ruff: noqa: E402
# PyTorch and the modules that use it load only here, after the flags.
import numpy as np
import torch
import torch.nn as nn

from infer_trt import (OrtBackend, TrtBackend, current_gpu_name, import_tensorrt, starting_tensorrt,
                       trt_logger, trt_unavailable_reason)
from sample import LowPrecision, TorchBackend, draw_samples, model_from_checkpoint, pixel_difference
from support import (ENGINE_NAME, ONNX_NAME, SHIPPED_CKPT, RunLock, atomic_write, check_writable,
                     checkpoint_or_shipped, config_dict, file_sha256, first_line, pick_device,
                     place_with_sidecar, refuse_overwrite, remove_dead_exports, same_file)

FP16_ONNX_NAME, CACHE_NAME = "model_fp16.onnx", "model_fp16.timing.cache"
ONNX_FILES = {ONNX_NAME: "fp32", FP16_ONNX_NAME: "fp16"}
WRITTEN = (ONNX_NAME, FP16_ONNX_NAME, ENGINE_NAME, CACHE_NAME)


# ----------------------------------------------------------------------------------------------
#                                       1. Trace to ONNX
# ----------------------------------------------------------------------------------------------


def export_onnx(module, path, example, opset):
    """torch.export-based ONNX export with a dynamic batch axis on x, t, y (and so on out). The graph is
    traced from a CPU copy of the module: tracing costs seconds, and a graph holds no device."""
    if any(p.device.type != "cpu" for p in module.parameters()):
        module = copy.deepcopy(module).cpu()
    batch = torch.export.Dim("batch", min=1)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)     # "torchvision is not installed", ...
    # The exporter's known-harmless warnings (deprecations, unused axis names) are hidden. Weights past
    # protobuf's 2 GB limit go to <file>.data beside the graph.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, path, input_names=["x", "t", "y"], output_names=["out"],
                          dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "y": {0: batch}},
                          opset_version=opset, dynamo=True, verbose=False, external_data=nbytes > 1.5e9)


def graph_summary(path):
    """(node count, Counter of op types) of an ONNX file, after onnx.checker's full check."""
    import onnx
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise UserError(f"exported graph {os.path.basename(path)} fails onnx.checker: "
                        f"{first_line(e)}") from None
    model = onnx.load(path, load_external_data=False)
    return len(model.graph.node), collections.Counter(n.op_type for n in model.graph.node)


# ----------------------------------------------------------------------------------------------
#                                   2. Check against PyTorch
# ----------------------------------------------------------------------------------------------


# How export.py checks what it exports against the PyTorch model before writing it: errors on random
# inputs (parity) within tolerances; fp16 where it is really computed (the activations' headroom, the fp16
# graph in fp16 arithmetic, the fp32 islands TensorRT must keep); a fixed-seed sampling run through each
# backend. A check that fails is a one-line UserError, and the export writes nothing.
#
# The fp16 gate is per image: every image's relative L2 error, ||out_i - ref_i|| / ||ref_i|| over its
# C x H x W outputs, must stay within FP16_TOLERANCE. One image's error does not depend on how many others
# share its batch, so the gate means the same at batch 1 and at batch 256, and one broken image still fails
# it. A maximum over every output of a batch (max|d| / max|ref|) is not that: it picks the extreme of
# 256 x 1,024 rounding errors and grows with the batch. The engine check and the CPU checks of the fp16 model
# and of the fp16 graph run the same batch sizes on the same inputs (check_batches, one seed), so that what
# passes on the CPU passes the engine check for the same arithmetic. The tolerance leaves room for what
# TensorRT's kernels may add on top of that arithmetic: its fused attention accumulates in fp16 unless Q, K
# and V are upcast (TensorRT 11.3 release notes), which docs/results.md measures in an emulation.

FP32_ATOL = 1e-4        # max|ONNX - PyTorch|, scaled by max|PyTorch| when that exceeds 1
FP16_TOLERANCE = 1e-2   # every image's ||fp16 - PyTorch fp32|| / ||PyTorch fp32|| (see the comment above)
FP16_MAX = 65504.0      # largest finite fp16
FP16_MARGIN = 16        # activations must stay this many times below FP16_MAX, or the export fails
CHECK_CFG = 2.0         # guidance of the fixed-seed check runs: a doubled batch, as in sampling


def check_batches(max_batch):
    """The batch sizes every fp16 check runs: 1, 7 and the engine profile's largest, max_batch."""
    return sorted({1, min(7, max_batch), max_batch})


def errors(ref, out):
    """Errors of out against ref: max-abs, relative (max|d| / max|ref|), relative L2 over the batch
    (||d|| / ||ref||) and the largest relative L2 of one image (the fp16 gate)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    d = out - ref
    scale, norm = ref.abs().max().item(), ref.norm().item()
    per_image = d.flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp(min=1e-12)    # (N,)
    return {"max_abs": d.abs().max().item(), "rel": d.abs().max().item() / max(scale, 1e-12),
            "rel_l2": d.norm().item() / max(norm, 1e-12), "image_rel_l2": per_image.max().item(),
            "ref_max": scale}


def random_inputs(config, num_timesteps, n, generator):
    """Random x ~ N(0, I), t uniform over [0, T), y over every class and the null class."""
    x = torch.randn((n, *config.image_shape), generator=generator)
    t = torch.randint(0, num_timesteps, (n,), generator=generator)
    y = torch.randint(0, config.num_classes + 1, (n,), generator=generator)
    return x, t, y


def parity(reference, candidate, config, num_timesteps, batch_sizes=(1, 7), seed=0):
    """Errors of candidate against reference on the same random inputs, one row per batch size."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_sizes:
        x, t, y = random_inputs(config, num_timesteps, n, g)
        rows.append({"batch": n, **errors(reference(x, t, y), candidate(x, t, y))})
    return rows


def check_tolerance(rows, precision, name):
    """Fail loudly when an exported graph computes something else than the PyTorch model."""
    for r in rows:
        if precision == "fp32" and r["max_abs"] > FP32_ATOL * max(1.0, r["ref_max"]):
            raise UserError(f"{name} differs from PyTorch by max-abs {r['max_abs']:.2e} > {FP32_ATOL:.0e} "
                            f"at batch {r['batch']}: the export is wrong, do not deploy it")
        if precision == "fp16" and not r["image_rel_l2"] <= FP16_TOLERANCE:
            raise UserError(f"{name} differs from PyTorch by {r['image_rel_l2']:.2e} > {FP16_TOLERANCE:.0e} "
                            f"(one image's relative L2) at batch {r['batch']}: fp16 loses too much for this "
                            f"model; deploy model.onnx (fp32)")


def print_parity(name, rows):
    for r in rows:
        print(f"  {name:16s} batch {r['batch']:3d}: max-abs {r['max_abs']:.2e}  rel {r['rel']:.2e}  "
              f"rel-L2 {r['rel_l2']:.2e}  worst image rel-L2 {r['image_rel_l2']:.2e}  "
              f"(max|ref| {r['ref_max']:.2f})")


def fixed_seed_sample(fn, diffusion, config, steps, seed, cfg_scale, num=8, device="cpu"):
    """A short deterministic DDIM run (eta 0): the same seed gives the same noise on every backend."""
    labels = ((torch.arange(num) + seed) % config.num_classes).tolist()
    return draw_samples(fn, diffusion, config, labels, torch.Generator().manual_seed(seed), sampler="ddim",
                        steps=steps, cfg_scale=cfg_scale, batch_size=num, device=device)


def check_engine(torch_fn, engine_fn, diffusion, config, max_batch, steps, seed, device="cuda"):
    """The engine against the PyTorch model on the same GPU, only at batch sizes its profile [1, max_batch]
    accepts: parity at check_batches(max_batch), on the inputs export's CPU checks used, and a guided
    fixed-seed DDIM run of up to 8 digits (guidance doubles the batch, so max_batch // 2 at most).
    Returns (parity rows, pixel difference)."""
    rows = parity(torch_fn, engine_fn, config, diffusion.num_timesteps, batch_sizes=check_batches(max_batch),
                  seed=seed)
    print_parity("TRT fp16 vs torch", rows)
    check_tolerance(rows, "fp16", ENGINE_NAME)
    num = min(8, max_batch // 2)
    reference = fixed_seed_sample(torch_fn, diffusion, config, steps, seed, CHECK_CFG, num=num, device=device)
    images = fixed_seed_sample(engine_fn, diffusion, config, steps, seed, CHECK_CFG, num=num, device=device)
    ddim = pixel_difference(reference.cpu(), images.cpu())
    print(f"  DDIM {steps} steps, CFG {CHECK_CFG:g}, seed {seed}, {num} images: engine vs PyTorch largest "
          f"pixel difference {ddim['float']:.3f} / 255 (uint8: {ddim['uint8']})")
    return rows, ddim


def fp16_headroom(model, diffusion, config, steps, seed, device="cpu"):
    """How far the model's activations stay below fp16's maximum: per-block peaks over the fixed-seed DDIM run
    (two batches of 8, with guidance: real x_t from t = T-1 to 0) and over random inputs at five timesteps
    (two batches each). Fails the export when the largest comes within FP16_MARGIN of 65504."""
    fn, T = TorchBackend(model), diffusion.num_timesteps
    with activation_peaks(model) as peaks:
        for batch in range(2):
            fixed_seed_sample(fn, diffusion, config, steps, seed + batch, CHECK_CFG, device=device)
            g = torch.Generator().manual_seed(seed + batch)
            for t in (0, T // 4, T // 2, 3 * T // 4, T - 1):
                x, _, y = random_inputs(config, T, 8, g)
                fn(x, torch.full_like(y, t), y)
    peak = max(max(v) for v in peaks.values())
    print("  activation peaks (max |residual stream| / max |Linear output|) per block: "
          + "; ".join(f"{i}: {a:.1f}/{b:.1f}" for i, (a, b) in peaks.items()))
    print(f"  largest activation {peak:.1f}: {FP16_MAX / max(peak, 1e-9):.0f}x below the fp16 maximum 65504 "
          f"(the export requires {FP16_MARGIN}x)")
    if not peak < FP16_MAX / FP16_MARGIN:
        raise UserError(f"activations reach {peak:.0f}, within {FP16_MARGIN}x of fp16's maximum 65504: "
                        f"the fp16 graph and engine could overflow; "
                        f"this checkpoint cannot be exported in fp16")
    return peak


@contextlib.contextmanager
def activation_peaks(model):
    """Record, per DiT block, max |residual stream| (the block's output) and max |any Linear output| inside
    it (qkv, attention proj, MLP, adaLN modulation): how close fp16 (max 65504) comes to overflowing."""
    peaks, handles = {}, []

    def track(i, slot):
        def hook(module, inputs, output):
            peaks[i][slot] = max(peaks[i][slot], output.detach().abs().max().item())
        return hook
    for i, block in enumerate(model.blocks):
        peaks[i] = [0.0, 0.0]
        handles.append(block.register_forward_hook(track(i, 0)))
        handles += [m.register_forward_hook(track(i, 1)) for m in block.modules() if isinstance(m, nn.Linear)]
    try:
        yield peaks
    finally:
        for h in handles:
            h.remove()


def _fp16_matmul(a, b):
    """An fp16 matrix product as fp16 GEMMs compute it (and numpy's own fp16 matmul): fp16 inputs, fp32
    sums, the result rounded to fp16. Through BLAS in fp32, where numpy's fp16 loop has no BLAS."""
    if a.dtype != np.float16:
        return np.matmul(a, b)
    return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)


def fp16_graph(model):
    """The fp16 graph (a path or a loaded ONNX model) as TensorRT receives it, computed in fp16, as a backend
    f(x, t, y) -> out: onnx's reference runtime evaluates every node with numpy at the graph's declared
    types, so each fp16 node's result is rounded to fp16, where ONNX Runtime's CPU provider upcasts fp16
    nodes to fp32. Its .heavy says how many MatMul/Gemm/Conv/Attention nodes computed in fp16 on the last
    call."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class MatMul(OpRun):
        def _run(self, a, b):
            return (_fp16_matmul(a, b),)

    class Gemm(OpRun):
        """ONNX Gemm: alpha A'B' + beta C, each step at the inputs' type, as the reference runtime's own."""
        def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
            out = _fp16_matmul(a.T if transA else a, b.T if transB else b) * a.dtype.type(alpha)
            return (out if c is None else out + c * a.dtype.type(beta),)

    graph = onnx.load(model) if isinstance(model, (str, os.PathLike)) else model
    evaluator = ReferenceEvaluator(graph, new_ops=[MatMul, Gemm])
    heavy = [n.output[0] for n in graph.graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "Attention")]

    def run(x, t, y):
        with np.errstate(over="ignore", invalid="ignore"):        # an overflow shows as inf or NaN
            values = evaluator.run(None, {"x": x.cpu().numpy(), "t": t.cpu().numpy(), "y": y.cpu().numpy()},
                                   intermediate=True)
        run.heavy = f"{sum(values[name].dtype == np.float16 for name in heavy)}/{len(heavy)}"
        return torch.from_numpy(values["out"]).to(x.device)
    return run


def fp16_arithmetic(path, reference, config, num_timesteps, seed, max_batch):
    """The fp16 graph computed in fp16 (fp16_graph) against PyTorch fp32, at the engine check's batch sizes
    and inputs; inf or NaN fails. Returns the parity rows, each with how many matmuls computed in fp16."""
    graph_fn = fp16_graph(path)
    rows = parity(reference, graph_fn, config, num_timesteps, batch_sizes=check_batches(max_batch), seed=seed)
    for r in rows:
        r["matmuls_in_fp16"] = graph_fn.heavy
        if not np.isfinite(r["max_abs"]):
            raise UserError(f"{os.path.basename(path)} computed in fp16 gives inf or NaN: fp16 overflows for "
                            f"this model; deploy model.onnx (fp32)")
    return rows


def fp32_islands(path):
    """For the fp16 graph: {op: (nodes computing in fp32, nodes)} for LayerNormalization, Sin, Cos, and
    the number of Casts. TensorRT 11 keeps each tensor in its ONNX type, so these must read n/n."""
    import onnx
    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    islands = {}
    for op in ("LayerNormalization", "Sin", "Cos"):
        nodes = [n for n in g.node if n.op_type == op]
        islands[op] = (sum(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in nodes), len(nodes))
    islands["Cast"] = sum(n.op_type == "Cast" for n in g.node)
    return islands


def check_fp32_islands(path, name):
    """TensorRT 11 keeps each tensor in its ONNX type: LayerNorm and sin/cos must compute in fp32."""
    islands = fp32_islands(path)
    counts = {k: v for k, v in islands.items() if k != "Cast"}
    print("  fp32 islands: " + ", ".join(f"{op} {a}/{b}" for op, (a, b) in counts.items())
          + f", {islands['Cast']} Casts")
    if any(a != b for a, b in counts.values()):
        raise UserError(f"{name}: some LayerNorm or sin/cos nodes compute in fp16 (overflow risk in "
                        f"TensorRT); dit.py must keep layer_norm_fp32 and an fp32 timestep embedding")


# ----------------------------------------------------------------------------------------------
#                                 3. Build the TensorRT engine
# ----------------------------------------------------------------------------------------------


def build_engine(onnx_path, engine_path, cache_path, chw, batches, opt_level=3, workspace_gb=4):
    """Build a TensorRT 11 engine from the fp16 ONNX (strongly typed: no precision flags exist).
    batches = (min, opt, max) of the optimisation profile shared by x, t and y."""
    trt = import_tensorrt()
    logger = trt_logger(trt)
    with starting_tensorrt(trt):
        builder = trt.Builder(logger)
    network = builder.create_network(0)                 # 11.x: always strongly typed, explicit batch
    onnx_parser = trt.OnnxParser(network, logger)
    if not onnx_parser.parse_from_file(onnx_path):      # from a file: finds model.onnx.data beside it
        reasons = "; ".join(onnx_parser.get_error(i).desc() for i in range(onnx_parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {reasons[:300]}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    builder_config.builder_optimization_level = opt_level
    low, opt, high = batches
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (low, *chw), (opt, *chw), (high, *chw))     # (min, opt, max) shapes
    profile.set_shape("t", (low,), (opt,), (high,))
    profile.set_shape("y", (low,), (opt,), (high,))
    builder_config.add_optimization_profile(profile)
    blob = b""
    if os.path.isfile(cache_path):
        with open(cache_path, "rb") as f:
            blob = f.read()
    # create_timing_cache returns None for a blob it cannot read (a damaged file, or one from another
    # TensorRT version; trtexec checks for it, shared/utils/cacheUtils.cpp) and set_timing_cache False for one
    # from another GPU: both start a new, empty cache, as Polygraphy does (backend/trt/config.py).
    cache = builder_config.create_timing_cache(blob)
    if cache is None or not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"  {cache_path} cannot be used (damaged, or made by another GPU or TensorRT version): "
              f"starting a new timing cache")
        cache = builder_config.create_timing_cache(b"")
        if cache is None or not builder_config.set_timing_cache(cache, ignore_mismatch=False):
            raise UserError("TensorRT cannot create an empty timing cache (its log above says why)")
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    atomic_write(engine_path, lambda f: f.write(plan))
    atomic_write(cache_path, lambda f: f.write(builder_config.get_timing_cache().serialize()))
    return trt.__version__


# ----------------------------------------------------------------------------------------------
#                     main: each stage's files written only once they pass
# ----------------------------------------------------------------------------------------------


def export_metadata(ckpt_path, weights_flag, opset, model, diffusion, class_names, ckpt):
    """What every sidecar records: the checkpoint (path, SHA-256, weights, step), configs, I/O, versions."""
    import onnx
    import onnxruntime
    config, pred = model.config, diffusion.config.prediction
    has_ema = ckpt.get("ema") is not None or ckpt.get("sampling_only")     # sampling-only: EMA weights
    weights = "ema" if weights_flag == "ema" and has_ema else "model"
    print(f"{ckpt_path}: step {ckpt.get('step')}, {weights} weights, predicts {pred}"
          f"{' + variance' if config.learn_sigma else ''}, output (N, {config.out_channels}, "
          f"{config.image_size}, {config.image_size})")
    return {"checkpoint": {"path": os.path.abspath(ckpt_path), "sha256": file_sha256(ckpt_path),
                           "weights": weights, "step": ckpt.get("step")},
            "model_config": config_dict(config), "diffusion_config": config_dict(diffusion.config),
            "class_names": class_names, "opset": opset,
            "io": {"x": ["N", *config.image_shape, "float32"], "t": ["N", "int64"], "y": ["N", "int64"],
                   "out": ["N", config.out_channels, config.image_size, config.image_size, "float32"],
                   "out_means": f"{pred}{' then variance interpolation' if config.learn_sigma else ''}"},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def export_checked_onnx(model, diffusion, meta, out_dir, opset, verify_steps, seed, max_batch):
    """Stage 1: both ONNX graphs, each checked against PyTorch in ONNX Runtime (and the fp16 one in fp16
    arithmetic, at the batch sizes and inputs the engine check will use), then moved beside each other with
    their sidecars. Nothing is written unless all pass."""
    config, T = model.config, diffusion.num_timesteps
    # Everything is written into a hidden temp folder and moved to out_dir only once checked.
    remove_dead_exports(out_dir)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".export-{os.getpid()}-")
    try:
        example = random_inputs(config, T, 2, torch.Generator().manual_seed(seed))
        device = next(model.parameters()).device        # the checks run where the model is: the GPU if any
        torch_fn = TorchBackend(model)
        # fp16 arithmetic, op by op with fp16 results (an overflow shows as inf): PyTorch's fp16 model on this
        # machine's device. ONNX Runtime's CPU provider cannot show it: it computes fp16 nodes in fp32.
        fp16_fn = TorchBackend(LowPrecision(model, torch.float16))
        fp16_rows = parity(torch_fn, fp16_fn, config, T, batch_sizes=check_batches(max_batch), seed=seed)
        print_parity(f"torch fp16 ({device.type}) vs fp32", fp16_rows)
        check_tolerance(fp16_rows, "fp16", f"the fp16 model on {device}")
        peak = fp16_headroom(model, diffusion, config, verify_steps, seed, device)
        results = {}
        for name, precision in ONNX_FILES.items():
            path, start = os.path.join(tmp, name), time.time()
            module = model if precision == "fp32" else LowPrecision(model, torch.float16)
            export_onnx(module, path, example, opset)
            nodes, ops = graph_summary(path)
            print(f"{name}: opset {opset}, {nodes} nodes, {os.path.getsize(path) / 2**20:.1f} MiB, "
                  f"exported in {time.time() - start:.1f} s; ops: "
                  + ", ".join(f"{op} {k}" for op, k in ops.most_common()))
            if precision == "fp16":
                check_fp32_islands(path, name)
            ort_fn = OrtBackend(path, providers=["CPUExecutionProvider"], meta=meta)
            rows = parity(torch_fn, ort_fn, config, T, seed=seed)
            print_parity(f"ORT {precision} vs torch", rows)
            check_tolerance(rows, precision, name)
            results[name] = {"precision": precision, "ort_fn": ort_fn, "parity": rows, "checks": {}}
            if precision == "fp16":
                start = time.time()
                rows = fp16_arithmetic(path, torch_fn, config, T, seed, max_batch)
                print_parity("fp16 arithmetic", rows)
                print(f"  ({rows[0]['matmuls_in_fp16']} MatMul/Gemm/Conv/Attention nodes computed in fp16 "
                      f"by onnx's reference runtime, {time.time() - start:.1f} s)")
                check_tolerance(rows, "fp16", f"{name} computed in fp16 (onnx reference runtime)")
                results[name]["checks"]["fp16_arithmetic_vs_torch"] = rows

        # The same fixed-seed DDIM run through PyTorch and both ONNX graphs: what a user would see.
        reference = fixed_seed_sample(torch_fn, diffusion, config, verify_steps, seed, CHECK_CFG,
                                      device=device)
        for name, r in results.items():
            images = fixed_seed_sample(r["ort_fn"], diffusion, config, verify_steps, seed, CHECK_CFG,
                                       device=device)
            r["ddim"] = pixel_difference(reference, images)
            print(f"  DDIM {verify_steps} steps, CFG {CHECK_CFG:g}, seed {seed}, 8 images: {name} vs "
                  f"PyTorch largest pixel difference {r['ddim']['float']:.3f} / 255 "
                  f"(uint8: {r['ddim']['uint8']})")

        for name, r in results.items():
            place_with_sidecar(os.path.join(tmp, name), os.path.join(out_dir, name), {
                **meta, "kind": "onnx", "precision": r["precision"],
                "checks": {"ort_vs_torch": r["parity"], "ddim_pixel_difference": r["ddim"],
                           "torch_fp16_vs_fp32": {"device": device.type, "rows": fp16_rows},
                           "activation_peak": peak, **r["checks"]}})
            print(f"wrote {os.path.join(out_dir, name)} (+ .json)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_checked_engine(model, diffusion, meta, out_dir, batch_size, max_batch, opt_level, workspace_gb,
                         verify_steps, seed):
    """Stage 2: the TensorRT fp16 engine from model_fp16.onnx, tuned for batch 2 x batch_size (guidance
    doubles the sampling batch), checked against PyTorch on the same GPU before it and its sidecar replace
    an earlier one."""
    onnx_path = os.path.join(out_dir, FP16_ONNX_NAME)
    engine_path = os.path.join(out_dir, ENGINE_NAME)
    cache_path = os.path.join(out_dir, CACHE_NAME)
    new_engine = os.path.join(out_dir, f".{ENGINE_NAME}.unchecked")    # becomes the engine once checked
    batches = (1, 2 * batch_size, max_batch)
    start = time.time()
    version = build_engine(onnx_path, new_engine, cache_path, model.config.image_shape, batches, opt_level,
                           workspace_gb)
    print(f"{ENGINE_NAME}: TensorRT {version}, profile min/opt/max batch {batches}, "
          f"opt level {opt_level}, built in {time.time() - start:.0f} s")
    engine_meta = {**meta, "kind": "engine", "precision": "fp16", "onnx": FP16_ONNX_NAME,
                   "versions": {**meta["versions"], "tensorrt": version},
                   "gpu": {"name": current_gpu_name(),
                           "capability": list(torch.cuda.get_device_capability(0))},
                   "profile": {**dict(zip(("min", "opt", "max"), batches)),
                               "opt_is": f"2 x --batch-size {batch_size}: "
                                         f"guidance doubles the sampling batch"},
                   "builder_optimization_level": opt_level}
    try:
        model = model.cuda()
        trt_fn = TrtBackend(new_engine, meta=engine_meta)
        rows, ddim = check_engine(TorchBackend(model), trt_fn, diffusion, model.config, max_batch,
                                  verify_steps, seed)
        place_with_sidecar(new_engine, engine_path, {
            **engine_meta, "checks": {"trt_vs_torch": rows, "ddim_pixel_difference": ddim}})
    finally:
        for leftover in (new_engine, new_engine + ".json"):    # a failed check leaves no engine behind
            if os.path.exists(leftover):
                os.remove(leftover)
    print(f"wrote {engine_path} (+ .json) and {cache_path}")


def main(argv=None):
    args = parse_args(argv)
    if args.opset == EXPERIMENTAL_OPSET:
        print(f"note: opset {args.opset} is experimental: "
              f"its ONNX Attention nodes are new to TensorRT's importer")
    args.ckpt = checkpoint_or_shipped(args.ckpt)
    shipped = same_file(args.ckpt, SHIPPED_CKPT)
    out_dir = args.out_dir or (SHIPPED_EXPORT_DIR if shipped else os.path.dirname(os.path.abspath(args.ckpt)))
    outputs = WRITTEN + tuple(f + ".json" for f in WRITTEN)
    refuse_overwrite({f"--out-dir's {f}": os.path.join(out_dir, f) for f in outputs}, {"--ckpt": args.ckpt})
    model, diffusion, class_names, ckpt = model_from_checkpoint(args.ckpt, pick_device(args.device),
                                                                use_ema=args.weights == "ema")
    check_writable(os.path.join(out_dir, ONNX_NAME))
    if args.verify_steps > diffusion.num_timesteps:
        raise UserError(f"--verify-steps {args.verify_steps} exceeds the {diffusion.num_timesteps} timesteps "
                        f"the model was trained with; pass at most --verify-steps {diffusion.num_timesteps}")
    meta = export_metadata(args.ckpt, args.weights, args.opset, model, diffusion, class_names, ckpt)
    with RunLock(out_dir, what="export"):           # one export at a time into a folder
        export_checked_onnx(model, diffusion, meta, out_dir, args.opset, args.verify_steps, args.seed,
                            args.max_batch)
        reason = trt_unavailable_reason()
        if reason:
            print(f"TensorRT engine skipped: {reason}. The ONNX files are ready "
                  f"(infer_trt.py --backend ort).")
            return
        build_checked_engine(model, diffusion, meta, out_dir, args.batch_size, args.max_batch,
                             args.opt_level, args.workspace_gb, args.verify_steps, args.seed)


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --max-batch")
