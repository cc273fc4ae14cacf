"""
How export.py checks what it exports against the PyTorch model before writing it: errors on random
inputs (parity) within tolerances; fp16 where it is really computed (the activations' headroom, the fp16
graph in fp16 arithmetic, the fp32 islands TensorRT must keep); a fixed-seed sampling run through each
backend. A check that fails is a one-line UserError, and the export writes nothing.

The fp16 gate is per image: every image's relative L2 error, ||out_i - ref_i|| / ||ref_i|| over its
C x H x W outputs, must stay within FP16_TOLERANCE. One image's error does not depend on how many others
share its batch, so the gate means the same at batch 1 and at batch 256, and one broken image still fails
it. A maximum over every output of a batch (max|d| / max|ref|) is not that: it picks the extreme of
256 x 1,024 rounding errors and grows with the batch. The engine check and the CPU checks of the fp16 model
and of the fp16 graph run the same batch sizes on the same inputs (check_batches, one seed), so that what
passes on the CPU passes the engine check for the same arithmetic. The tolerance leaves room for what
TensorRT's kernels may add on top of that arithmetic: its fused attention accumulates in fp16 unless Q, K
and V are upcast (TensorRT 11.3 release notes), which docs/results.md measures in an emulation.
"""
import contextlib
import os

import numpy as np
import torch
import torch.nn as nn

from backends import TorchBackend
from cli import UserError
from recipe import ENGINE_NAME
from sample import draw_samples, pixel_difference

FP32_ATOL = 1e-4        # max|ONNX - PyTorch|, scaled by max|PyTorch| when that exceeds 1
FP16_TOLERANCE = 1e-2   # every image's ||fp16 - PyTorch fp32|| / ||PyTorch fp32|| (see the docstring)
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


def print_parity(name, rows):
    for r in rows:
        print(f"  {name:16s} batch {r['batch']:3d}: max-abs {r['max_abs']:.2e}  rel {r['rel']:.2e}  "
              f"rel-L2 {r['rel_l2']:.2e}  worst image rel-L2 {r['image_rel_l2']:.2e}  "
              f"(max|ref| {r['ref_max']:.2f})")
