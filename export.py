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
"""
import collections
import copy
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings

from cli import run_cli
from recipe import parse_export_args

if __name__ == "__main__":
    run_cli(lambda: parse_export_args(sys.argv[1:]))   # --help and flag errors answer before PyTorch loads

import torch

from backends import (LowPrecision, OrtBackend, TorchBackend, TrtBackend, current_gpu_name, import_tensorrt,
                      starting_tensorrt, trt_logger, trt_unavailable_reason)
from checkpoint import (checkpoint_or_shipped, config_dict, file_sha256, model_from_checkpoint,
                        write_sidecar)
from cli import UserError, first_line, pick_device
from export_checks import (CHECK_CFG, check_batches, check_engine, check_fp32_islands, check_tolerance,
                           fixed_seed_sample, fp16_arithmetic, fp16_headroom, parity, print_parity,
                           random_inputs)
from guard import atomic_write, check_writable, move_into_place, refuse_overwrite, same_file
from recipe import ENGINE_NAME, EXPERIMENTAL_OPSET, ONNX_NAME, SHIPPED_CKPT, SHIPPED_EXPORT_DIR
from sample import pixel_difference

FP16_ONNX_NAME, CACHE_NAME = "model_fp16.onnx", "model_fp16.timing.cache"
ONNX_FILES = {ONNX_NAME: "fp32", FP16_ONNX_NAME: "fp16"}
WRITTEN = (ONNX_NAME, FP16_ONNX_NAME, ENGINE_NAME, CACHE_NAME)


# ----------------------------------------------------------------------------------------------
#                                        ONNX export
# ----------------------------------------------------------------------------------------------

def export_onnx(module, path, example, opset):
    """torch.export-based ONNX export with a dynamic batch axis on x, t, y (and so on out). The graph is
    traced from a CPU copy of the module: tracing costs seconds, and a graph holds no device."""
    if any(p.device.type != "cpu" for p in module.parameters()):
        module = copy.deepcopy(module).cpu()
    batch = torch.export.Dim("batch", min=1)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)     # "torchvision is not installed", ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # known-harmless exporter warnings
                                             # (deprecations, unused axis names)
        torch.onnx.export(module, example, path, input_names=["x", "t", "y"], output_names=["out"],
                          dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "y": {0: batch}},
                          opset_version=opset, dynamo=True, verbose=False,
                          external_data=nbytes > 1.5e9)          # protobuf's 2 GB limit:
                                                                 # weights in .onnx.data


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
#                                     TensorRT engine
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
#                                           main
# ----------------------------------------------------------------------------------------------

def remove_dead_exports(out_dir):
    """The temp folders of exports that were killed (.export-<pid>-*, the pid no longer running; older ones
    without a pid), so they do not pile up."""
    for name in os.listdir(out_dir):
        match = re.fullmatch(r"\.export-(?:(\d+)-)?\w+", name)
        if not match or not os.path.isdir(os.path.join(out_dir, name)):
            continue
        if match.group(1):
            try:
                os.kill(int(match.group(1)), 0)          # signal 0: only asks whether the process exists
                continue
            except ProcessLookupError:
                pass
            except PermissionError:                       # it exists, owned by someone else
                continue
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def export_metadata(ckpt_path, weights_flag, opset, model, diffusion, class_names, ckpt):
    """What every sidecar records: the checkpoint (path, SHA-256, weights, step), configs, I/O, versions."""
    import onnx
    import onnxruntime
    config, pred = model.config, diffusion.config.prediction
    has_ema = ckpt.get("ema") is not None or ckpt.get("sampling_only")     # a sampling-only file:
                                                                           # EMA weights only
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
            move_into_place(os.path.join(tmp, name), os.path.join(out_dir, name))
            write_sidecar(os.path.join(out_dir, name), {
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
        move_into_place(new_engine, engine_path)
        write_sidecar(engine_path, {**engine_meta,
                                    "checks": {"trt_vs_torch": rows, "ddim_pixel_difference": ddim}})
    finally:
        if os.path.exists(new_engine):     # a failed check leaves no engine behind
            os.remove(new_engine)
    print(f"wrote {engine_path} (+ .json) and {cache_path}")


def main(argv=None):
    args = parse_export_args(argv)
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
    export_checked_onnx(model, diffusion, meta, out_dir, args.opset, args.verify_steps, args.seed,
                        args.max_batch)
    reason = trt_unavailable_reason()
    if reason:
        print(f"TensorRT engine skipped: {reason}. The ONNX files are ready (infer_trt.py --backend ort).")
        return
    build_checked_engine(model, diffusion, meta, out_dir, args.batch_size, args.max_batch, args.opt_level,
                         args.workspace_gb, args.verify_steps, args.seed)


if __name__ == "__main__":
    run_cli(main, memory_hint="lower --max-batch")
