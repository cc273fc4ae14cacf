"""
How export.py checks what it exports against the PyTorch model before writing it: errors on random
inputs (parity) within tolerances; fp16 where it is really computed (the activations' headroom, the fp16
graph in fp16 arithmetic, the fp32 islands TensorRT must keep); a fixed-seed sampling run through each
backend. A check that fails is a one-line UserError, and the export writes nothing.
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
FP16_RTOL = 1e-2        # max|fp16 - PyTorch fp32| / max|PyTorch fp32|
FP16_MAX = 65504.0      # largest finite fp16
FP16_MARGIN = 16        # activations must stay this many times below FP16_MAX, or the export fails
CHECK_CFG = 2.0         # guidance of the fixed-seed check runs: a doubled batch, as in sampling


def errors(ref, out):
    """max-abs, relative (max|d| / max|ref|) and relative L2 (||d|| / ||ref||) error of out against ref."""
    out, ref = out.double().cpu(), ref.double().cpu()
    d = out - ref
    scale, norm = ref.abs().max().item(), ref.double().norm().item()
    return {"max_abs": d.abs().max().item(), "rel": d.abs().max().item() / max(scale, 1e-12),
            "rel_l2": d.norm().item() / max(norm, 1e-12), "ref_max": scale}


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
        if precision == "fp16" and r["rel"] > FP16_RTOL:
            raise UserError(f"{name} differs from PyTorch by rel {r['rel']:.2e} > {FP16_RTOL:.0e} at batch "
                            f"{r['batch']}: fp16 loses too much for this model; deploy model.onnx (fp32)")


def fp16_arithmetic(path, reference, config, num_timesteps, seed, batch=2):
    """The fp16 graph as TensorRT receives it, computed in fp16: onnx's reference runtime evaluates every node
    with numpy at the graph's declared types, so each fp16 node's result is rounded to fp16 (numpy's fp16
    matmuls accumulate in fp32, as fp16 GEMMs on a GPU do), where ONNX Runtime's CPU provider upcasts them
    to fp32. Compared with PyTorch fp32 within FP16_RTOL; inf or NaN fails."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    graph = onnx.load(path)
    x, t, y = random_inputs(config, num_timesteps, batch, torch.Generator().manual_seed(seed))
    with np.errstate(over="ignore", invalid="ignore"):           # an overflow is reported below,
                                                                 # as inf or NaN
        values = ReferenceEvaluator(graph).run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()},
                                               intermediate=True)
    heavy = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "Attention")]
    in_fp16 = sum(values[n.output[0]].dtype == np.float16 for n in heavy)
    out = torch.from_numpy(values["out"])
    if not torch.isfinite(out).all():
        raise UserError(f"{os.path.basename(path)} computed in fp16 gives inf or NaN: fp16 overflows for "
                        f"this model; deploy model.onnx (fp32)")
    return {"batch": batch, **errors(reference(x, t, y), out), "matmuls_in_fp16": f"{in_fp16}/{len(heavy)}"}


def fixed_seed_sample(fn, diffusion, config, steps, seed, cfg_scale, num=8, device="cpu"):
    """A short deterministic DDIM run (eta 0): the same seed gives the same noise on every backend."""
    labels = ((torch.arange(num) + seed) % config.num_classes).tolist()
    return draw_samples(fn, diffusion, config, labels, torch.Generator().manual_seed(seed), sampler="ddim",
                        steps=steps, cfg_scale=cfg_scale, batch_size=num, device=device)


def check_engine(torch_fn, engine_fn, diffusion, config, max_batch, steps, seed, device="cuda"):
    """The engine against the PyTorch model on the same GPU, only at batch sizes its profile [1, max_batch]
    accepts: parity at batch 1, 7 and max_batch, and a guided fixed-seed DDIM run of up to 8 digits
    (guidance doubles the batch, so max_batch // 2 at most). Returns (parity rows, pixel difference)."""
    batches = sorted({1, min(7, max_batch), max_batch})
    rows = parity(torch_fn, engine_fn, config, diffusion.num_timesteps, batch_sizes=batches, seed=seed)
    print_parity("TRT fp16 vs torch", rows)
    check_tolerance(rows, "fp16", ENGINE_NAME)
    num = min(8, max_batch // 2)
    reference = fixed_seed_sample(torch_fn, diffusion, config, steps, seed, CHECK_CFG, num=num, device=device)
    images = fixed_seed_sample(engine_fn, diffusion, config, steps, seed, CHECK_CFG, num=num, device=device)
    ddim = pixel_difference(reference.cpu(), images.cpu())
    print(f"  DDIM {steps} steps, CFG {CHECK_CFG:g}, seed {seed}, {num} images: engine vs PyTorch largest "
          f"pixel difference {ddim['float']:.3f} / 255 (uint8: {ddim['uint8']})")
    return rows, ddim


def fp16_headroom(model, diffusion, config, steps, seed):
    """How far the model's activations stay below fp16's maximum: per-block peaks over the fixed-seed DDIM run
    (two batches of 8, with guidance: real x_t from t = T-1 to 0) and over random inputs at five timesteps
    (two batches each). Fails the export when the largest comes within FP16_MARGIN of 65504."""
    fn, T = TorchBackend(model), diffusion.num_timesteps
    with activation_peaks(model) as peaks:
        for batch in range(2):
            fixed_seed_sample(fn, diffusion, config, steps, seed + batch, CHECK_CFG)
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
        print(f"  {name:16s} batch {r['batch']:2d}: max-abs {r['max_abs']:.2e}  rel {r['rel']:.2e}  "
              f"rel-L2 {r['rel_l2']:.2e}  (max|ref| {r['ref_max']:.2f})")
