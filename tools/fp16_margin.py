"""
How much room export.py's fp16 gate leaves: on a checkpoint, at the engine check's batch sizes and inputs, the
largest relative L2 error of one image (the gate, FP16_TOLERANCE) and the old measure max|d| / max|ref|, for
three fp16 computations of the same model against PyTorch fp32:

    torch fp16          the fp16 copy of the model in PyTorch (fp32 sums in its matmuls)
    graph fp16          model_fp16.onnx computed in fp16 by onnx's reference runtime
                        (export.fp16_graph)
    fp16-sum attention  the fp16 copy with attention whose dot products sum in fp16, every partial sum
                        rounded: the worst case of what TensorRT's fused attention may do (it sums in fp16
                        unless Q, K and V are upcast: TensorRT 11.3 release notes)

    python tools/fp16_margin.py                      # the shipped model, export.py's default --max-batch
    python tools/fp16_margin.py --ckpt RUN/ckpt.pt --max-batch 64 --seeds 0,1,2
"""
import os
import sys
import tempfile

if __package__ in (None, ""):          # run as a script: the repository's modules, one folder up
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from support import ArgumentParser, checkpoint_or_shipped, nonnegative_int, number_list, positive_int, run_cli


def parse_args(argv):
    p = ArgumentParser(description="The fp16 gate's margin on a checkpoint (see the module docstring).")
    p.add_argument("--ckpt", default=None, help="checkpoint (None: the shipped model)")
    p.add_argument("--max-batch", type=positive_int, default=256, help="export.py's --max-batch")
    p.add_argument("--seeds", type=number_list(nonnegative_int), default=[0],
                   help="seeds of the check inputs")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda: parse_args(sys.argv[1:]))   # --help answers before PyTorch loads

# ruff: noqa: E402
import torch
import torch.nn.functional as F

import export
from sample import LowPrecision, TorchBackend, model_from_checkpoint


def fp16_sum_attention(q, k, v):
    """Softmax attention with fp16 products and fp16 running sums in both matrix products (softmax statistics
    in fp32, Q pre-scaled as the exported graph does): every partial sum is rounded to fp16."""
    q = q * q.shape[-1] ** -0.5
    scores = torch.zeros(*q.shape[:-1], k.shape[-2], dtype=q.dtype, device=q.device)
    for i in range(q.shape[-1]):
        scores = scores + q[..., i:i + 1] * k[..., i].unsqueeze(-2)           # (N, H, T, T)
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.zeros_like(q)
    for j in range(k.shape[-2]):
        out = out + p[..., j:j + 1] * v[..., j:j + 1, :]                      # (N, H, T, D/H)
    return out


def main(argv=None):
    args = parse_args(argv)
    model, diffusion, _, _ = model_from_checkpoint(checkpoint_or_shipped(args.ckpt))
    reference, fp16 = TorchBackend(model), TorchBackend(LowPrecision(model, torch.float16))
    config, T = model.config, diffusion.num_timesteps

    def fp16_sums(x, t, y):
        original = F.scaled_dot_product_attention            # dit.py calls it through this module
        F.scaled_dot_product_attention = fp16_sum_attention
        try:
            return fp16(x, t, y)
        finally:
            F.scaled_dot_product_attention = original

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model_fp16.onnx")
        example = export.random_inputs(config, T, 2, torch.Generator().manual_seed(0))
        export.export_onnx(LowPrecision(model, torch.float16), path, example, 20)
        candidates = {"torch fp16": fp16, "graph fp16": export.fp16_graph(path),
                      "fp16-sum attention": fp16_sums}
        print(f"gate: one image's relative L2 <= {export.FP16_TOLERANCE:g}\n")
        print("| seed | batch | computation | worst image rel-L2 | max abs / max ref |")
        print("|---|---|---|---|---|")
        for seed in args.seeds:
            for name, fn in candidates.items():
                batches = export.check_batches(args.max_batch)
                rows = export.parity(reference, fn, config, T, batch_sizes=batches, seed=seed)
                for r in rows:
                    print(f"| {seed} | {r['batch']} | {name} | {r['image_rel_l2']:.2e} | {r['rel']:.2e} |")


if __name__ == "__main__":
    run_cli(main)
