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
file for the chosen backend is looked up next to the others: model_fp16.engine, model.onnx.
"""
import os
import sys
import time

from cli import run_cli
from recipe import parse_infer_args

if __name__ == "__main__":
    run_cli(lambda: parse_infer_args(sys.argv[1:]))   # --help answers before torch loads

import torch

from backends import TorchBackend, open_backend, trt_unavailable_reason
from checkpoint import (check_sidecar, checkpoint_or_shipped, class_names_of, configs_from_checkpoint,
                        model_from_checkpoint)
from cli import UserError, pick_device
from diffusion import GaussianDiffusion
from guard import check_writable, refuse_overwrite
from recipe import ENGINE_NAME, ONNX_NAME, SHIPPED_EXPORT_DIR, sampling_values
from sample import draw_labelled, label_table_path, pixel_difference, save_labelled_grid

# --compare's verdict: the largest pixel difference (of 255 grey levels) allowed against PyTorch fp32. An fp32
# graph computes what PyTorch does up to rounding; the fp16 ones (engine, model_fp16.onnx) round to fp16.
PIXEL_TOLERANCE = {"fp32": 1.0, "fp16": 8.0}
NEAR_ZERO = 1e-3        # a reference network whose outputs stay below this is untrained:
                        # any comparison passes


def choose_backend(args):
    """The backend to run and its file: --backend, or the fastest one whose file and runtime are here."""
    given = args.engine or args.onnx or args.ckpt
    if given is None:                # the shipped model, and the files `python export.py` made from it
        args.ckpt = checkpoint_or_shipped(None)
        given = os.path.join(SHIPPED_EXPORT_DIR, ONNX_NAME)
    for flag, path in (("--engine", args.engine), ("--onnx", args.onnx), ("--ckpt", args.ckpt)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist; export.py writes the engine and the ONNX files")
    folder = os.path.dirname(os.path.abspath(given))
    engine = args.engine or os.path.join(folder, ENGINE_NAME)
    onnx_path = args.onnx or os.path.join(folder, ONNX_NAME)
    backend = args.backend
    no_trt = trt_unavailable_reason() if backend in ("trt", "auto") else None    # imports TensorRT
                                                                                 # where it can
    if backend == "trt" and no_trt:
        raise UserError(f"{no_trt}; use --backend ort")
    if backend == "torch" and not args.ckpt:
        raise UserError("--backend torch needs --ckpt RUN/ckpt.pt")
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
    args = parse_infer_args(argv)
    check_writable(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend, path = choose_backend(args)
    refuse_overwrite({"--out": args.out, "--out's label table": label_table_path(args.out)},
                     {"--engine": args.engine, "--onnx": args.onnx, "--ckpt": args.ckpt,
                      f"the {backend} file": path})
    fn = open_backend(backend, path, ckpt_path=args.ckpt, device=pick_device(args.device),
                      cuda_graph=args.cuda_graph)
    compare_ckpt = checkpoint_for(args, fn.meta, path) if args.compare else None    # found before
                                                                                    # the sampling
    model_config, diffusion_config = configs_from_checkpoint(fn.meta, path)   # sidecar (checked)
                                                                              # or checkpoint
    diffusion = GaussianDiffusion(diffusion_config)
    class_names = class_names_of(fn.meta, model_config)

    sampling = sampling_values(args)
    images, labels, seconds, timed = run_sampler(fn, diffusion, model_config, class_names, sampling)
    save_labelled_grid(images, labels, class_names, args.out, args.nrow)
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
