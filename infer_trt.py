"""
Sample digits from an exported model: a TensorRT engine, an ONNX file in ONNX Runtime, or (for
comparison) the PyTorch checkpoint, through diffusion.py's samplers, the same ones sample.py uses.

    python infer_trt.py --engine runs/mnist/model_fp16.engine --labels "7 seven 3" --out digits.png
    python infer_trt.py --onnx runs/mnist/model.onnx --backend ort --cfg-scale 2
    python infer_trt.py --engine runs/mnist/model_fp16.engine --compare      # vs PyTorch: pixels and ms/step

The files written by export.py are enough: the model and diffusion configs and the class names come
from the file's sidecar (`<file>.json`). --ckpt is needed only for --backend torch and --compare (when
the sidecar's checkpoint path no longer exists); when given it must be the checkpoint the file was
exported from, or the run stops with the command that fixes it.

Backend (default: the fastest available): trt (TensorRT + CUDA GPU), else ort, else torch. A missing
file for the chosen backend is looked up next to the others: model_fp16.engine, model.onnx.
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall when cores are shared
import argparse
import time

import torch

from backends import (BACKENDS, Timed, TrtBackend, OrtBackend, TorchBackend, check_profile, check_sidecar,
                      current_gpu_name, load_sidecar, trt_unavailable_reason)
from common import (DEFAULT_NUM_SAMPLES, UserError, add_sampling_args, check_sampling_args, choose_labels,
                    configs_from_checkpoint, draw_samples, load_checkpoint, model_from_checkpoint, parse_labels,
                    pick_device, run_cli, save_grid, to_uint8, write_label_table)
from diffusion import GaussianDiffusion

ENGINE_NAME, ONNX_NAME = "model_fp16.engine", "model.onnx"


def build_parser():
    p = argparse.ArgumentParser(description="Sample a labelled PNG grid on a TensorRT engine / ONNX Runtime / PyTorch.")
    a = p.add_argument
    a("--engine", default=None, help=f"TensorRT engine from export.py ({ENGINE_NAME})")
    a("--onnx", default=None, help=f"ONNX file from export.py (default: {ONNX_NAME} beside the engine)")
    a("--ckpt", default=None, help="the checkpoint: for --backend torch and --compare; checked against the sidecar")
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="auto = the fastest available")
    a("--cuda-graph", action="store_true", help="trt: replay each batch size as one CUDA graph")
    a("--compare", action="store_true", help="also run PyTorch from the same noise; print pixel difference and ms/step")
    a("--device", default=None, help="device of the torch backend (default: cuda if available)")
    add_sampling_args(p, default_out="samples_infer.png")    # the flags and defaults of sample.py
    return p


def resolve(args):
    """Pick the backend and its file; return (backend name, file path, sidecar or None)."""
    given = args.engine or args.onnx or args.ckpt
    if given is None:
        raise UserError("no model given; pass --engine FILE.engine, --onnx FILE.onnx or --ckpt ckpt.pt "
                        "(export.py writes the first two)")
    folder = os.path.dirname(os.path.abspath(given))
    engine = args.engine or os.path.join(folder, ENGINE_NAME)
    onnx_path = args.onnx or os.path.join(folder, ONNX_NAME)
    backend = args.backend
    if backend == "trt" and trt_unavailable_reason():
        raise UserError(f"{trt_unavailable_reason()}; use --backend ort")
    if backend == "auto":
        usable_trt = trt_unavailable_reason() is None and os.path.isfile(engine)
        backend = "trt" if usable_trt else "ort" if os.path.isfile(onnx_path) else "torch" if args.ckpt else None
        if backend is None:
            raise UserError(f"nothing to run: {onnx_path} does not exist and the engine needs TensorRT "
                            f"({trt_unavailable_reason() or 'the engine file is missing'}); pass --onnx or --ckpt")
        if args.engine and backend != "trt":
            print(f"note: not using the engine ({trt_unavailable_reason() or 'TensorRT is available'}); backend {backend}")
    path = {"trt": engine, "ort": onnx_path, "torch": args.ckpt}[backend]
    if backend == "torch":
        return backend, path, None
    meta = load_sidecar(path)                       # a missing file or sidecar is an error here
    check_sidecar(meta, path, ckpt_path=args.ckpt, gpu_name=current_gpu_name())
    return backend, path, meta


def checkpoint_for(args, meta, artifact, why):
    """The checkpoint for the PyTorch side: --ckpt, or the one the sidecar names (if it still exists)."""
    path = args.ckpt or (meta or {}).get("checkpoint", {}).get("path")
    if not path or not os.path.isfile(path):
        raise UserError(f"{why} needs the checkpoint; pass --ckpt RUN/ckpt.pt"
                        + (f" (the sidecar's {path} does not exist)" if path else ""))
    if meta is not None and args.ckpt is None:
        check_sidecar(meta, artifact, ckpt_path=path)
    return path


def run_sampler(fn, device, diffusion, model_config, args):
    """All images, drawn as sample.py draws them (common.draw_samples), and the seconds it took."""
    generator = torch.Generator().manual_seed(args.seed)
    labels = choose_labels(args, args.class_names, generator)
    start = time.perf_counter()
    images = draw_samples(fn, diffusion, model_config, labels, generator, sampler=args.sampler, steps=args.steps,
                          cfg_scale=args.cfg_scale, eta=args.eta, thresholding=args.thresholding,
                          batch_size=args.batch_size, device=device)
    return images, labels, time.perf_counter() - start


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_sampling_args(args)
    if args.backend == "torch" and not args.ckpt:
        raise UserError("--backend torch needs --ckpt RUN/ckpt.pt")
    backend, path, meta = resolve(args)
    source = meta if meta is not None else load_checkpoint(args.ckpt)
    model_config, diffusion_config = configs_from_checkpoint(source, path)
    diffusion = GaussianDiffusion(diffusion_config)
    if args.steps > diffusion.num_timesteps:
        raise UserError(f"--steps {args.steps} exceeds the {diffusion.num_timesteps} timesteps the model was trained with")
    args.class_names = source.get("class_names") or [str(i) for i in range(model_config.num_classes)]
    num_samples = len(parse_labels(args.labels, args.class_names)) if args.labels else \
        args.num_samples or DEFAULT_NUM_SAMPLES
    engine_batch = min(args.batch_size, num_samples) * (2 if args.cfg_scale != 1.0 else 1)
    if backend == "trt":
        check_profile(meta, engine_batch, path)
    weights = (meta or {}).get("checkpoint", {}).get("weights", "ema")

    if backend == "trt":
        fn = TrtBackend(path, cuda_graph=args.cuda_graph, meta=meta)
    elif backend == "ort":
        fn = OrtBackend(path, meta=meta)
    else:
        model, _, _, _ = model_from_checkpoint(args.ckpt, pick_device(args.device), use_ema=weights == "ema")
        fn = TorchBackend(model)
    timed = Timed(fn, fn.device)
    images, labels, seconds = run_sampler(timed, fn.device, diffusion, model_config, args)
    save_grid(images, args.out, nrow=args.nrow)
    write_label_table(labels, args.class_names, args.out, args.nrow)
    detail = f" ({', '.join(fn.providers)})" if backend == "ort" else f" on {fn.device}"
    print(f"{backend}{detail}: {len(labels)} images, {args.sampler} {args.steps} steps, CFG {args.cfg_scale}, "
          f"seed {args.seed}, {seconds:.2f} s, {timed.ms_per_call:.2f} ms per network call (batch {engine_batch}) -> {args.out}")

    if args.compare:
        ckpt_path = checkpoint_for(args, meta, path, "--compare")
        model, _, _, _ = model_from_checkpoint(ckpt_path, pick_device(args.device), use_ema=weights == "ema")
        device = next(model.parameters()).device
        reference = Timed(TorchBackend(model), device)
        ref_images, _, ref_seconds = run_sampler(reference, device, diffusion, model_config, args)
        diff_float = (images - ref_images).abs().max().item() * 127.5
        diff_uint8 = int((torch.from_numpy(to_uint8(images)).int() - torch.from_numpy(to_uint8(ref_images)).int())
                         .abs().max())
        print(f"torch on {device}: {ref_seconds:.2f} s, {reference.ms_per_call:.2f} ms per network call")
        print(f"largest pixel difference {backend} vs torch: {diff_float:.3f} / 255 (uint8: {diff_uint8}); "
              f"speed-up {reference.ms_per_call / max(timed.ms_per_call, 1e-9):.2f}x per call")


if __name__ == "__main__":
    run_cli(main)
