"""The GPU path, for anyone with a CUDA GPU: `pytest tests/test_gpu.py -rs`. Without one every test here skips
and says so, except the two T4 facts that a CPU can check with a stand-in for the GPU's capability.

Tolerances: a GPU's fp32 is not bit-reproducible across kernels (TF32, atomics, fused kernels), so "equal" here
means within 1e-4 relative for fp32 and the precision of the format for fp16 (1e-2) and bf16 (5e-2)."""
import csv
import os

import pytest
import torch

import support
import train
from conftest import MNIST
from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, DiTConfig

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_bf16 = pytest.mark.skipif(not CUDA or not support.has_fast_bf16("cuda"),
                                reason="needs a CUDA GPU with bf16 (compute capability 8 or newer)")
TINY = ["--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--batch-size", "32", "--device", "cuda",
        "--data-dir", MNIST, "--sample-every", "0"]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def losses(out):
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_dit(seed=0, **changes):
    """A small DiT with every weight random (a fresh one outputs exactly 0: adaLN-Zero would hide errors)."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(hidden_size=64, depth=2, num_heads=4, patch_size=4, **changes))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def batch(n=6, device="cuda"):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1, 32, 32, generator=g)
    return x.to(device), torch.randint(0, 1000, (n,), generator=g).to(device), torch.randint(0, 11, (n,), generator=g).to(device)


# ----------------------------------------------------------------------------------------------
#                          T4 facts (checked on any machine, with a stand-in)
# ----------------------------------------------------------------------------------------------

def test_auto_amp_is_fp16_with_a_grad_scaler_before_ampere_and_bf16_after(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))     # a T4
    assert train.pick_amp("auto", cuda) == (torch.float16, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))     # an A100
    assert train.pick_amp("auto", cuda) == (torch.bfloat16, False)
    assert train.pick_amp("auto", torch.device("cpu")) == (None, False)


def test_a_cpu_never_gets_fp16_training():
    with pytest.raises(support.UserError, match="--amp fp16 needs a CUDA GPU"):
        train.pick_amp("fp16", torch.device("cpu"))


@needs_cuda
def test_attention_runs_without_flash_kernels():
    """A T4 (sm_75) has no flash-attention kernels: the memory-efficient and math SDPA kernels must do."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = random_dit().cuda().half()
    x, t, y = batch()
    with torch.no_grad():
        reference = model(x.half(), t, y)
        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            with sdpa_kernel(backend):
                assert rel(model(x.half(), t, y), reference) < TOLERANCE[torch.float16], backend


# ----------------------------------------------------------------------------------------------
#                                          Training
# ----------------------------------------------------------------------------------------------

@needs_cuda
def test_grad_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    model = random_dit().cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in model.parameters()]
    x, t, y = batch()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x, t, y).float().mean() * float("inf")        # an overflow, as fp16 produces one
    scale = scaler.get_scale()
    assert train.optimizer_step(loss, model, optimizer, scaler, grad_clip=1.0) is True
    assert scaler.get_scale() < scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # the step was skipped
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x, t, y).float().square().mean()
    assert train.optimizer_step(loss, model, optimizer, scaler, grad_clip=1.0) is False


@needs_cuda
@pytest.mark.parametrize("amp", ["fp16", pytest.param("bf16", marks=needs_bf16)])
def test_amp_training_loss_falls(tmp_path, amp):
    out = str(tmp_path / amp)
    train.main([*TINY, "--amp", amp, "--steps", "60", "--warmup", "10", "--log-every", "10", "--out", out])
    values = losses(out)
    assert len(values) == 6 and sum(values[-2:]) < 0.7 * sum(values[:2]), values
    ckpt = support.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@needs_cuda
def test_compile_on_cuda_learns_what_eager_learns(tmp_path):
    args = [*TINY, "--amp", "off", "--steps", "20", "--log-every", "5"]
    train.main([*args, "--out", str(tmp_path / "eager")])
    train.main([*args, "--compile", "--out", str(tmp_path / "compiled")])
    assert losses(str(tmp_path / "compiled")) == pytest.approx(losses(str(tmp_path / "eager")), rel=1e-3)


@needs_cuda
def test_resume_on_cuda_continues_the_same_run(tmp_path):
    args = [*TINY, "--amp", "off", "--log-every", "1"]
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    train.main([*args, "--steps", "8", "--out", whole])
    train.main([*args, "--steps", "4", "--out", halves])
    train.main([*args, "--steps", "8", "--out", halves, "--resume", "auto"])
    a, b = (support.load_checkpoint(os.path.join(o, "ckpt.pt")) for o in (whole, halves))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k
    assert losses(halves) == pytest.approx(losses(whole), rel=1e-4)


# ----------------------------------------------------------------------------------------------
#                                          Sampling
# ----------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16)],
                         ids=["fp32", "fp16", "bf16"])
def test_cuda_graph_and_compiled_sampling_equal_eager(dtype):
    """CUDA graphs in every precision; torch.compile (cold compiles cost the most time here) in the one that
    tools/bench.py times on this GPU."""
    import speedups
    model = random_dit().cuda()
    reference = speedups.eager_fn(model)
    fns = [speedups.cuda_graph_fn(model, dtype)]
    if dtype == speedups.default_low_precision("cuda"):
        fns.append(speedups.compiled_fn(model, dtype, mode="reduce-overhead"))
    for fn in fns:
        for n in (3, 5, 3):                                   # a capture per batch size, then a replay
            x, t, y = batch(n)
            out, again = fn(x, t, y), fn(x, t, y)
            assert out.dtype == torch.float32 and torch.equal(out, again)
            assert rel(out, reference(x, t, y)) < TOLERANCE[dtype]


@needs_cuda
def test_sampling_on_cuda_draws_the_cpu_digits(tmp_path):
    """Deterministic samplers from the same seed: CUDA and CPU images agree to a fraction of a grey level."""
    from sample import TorchBackend
    from sample import draw_samples
    model, d = random_dit(), GaussianDiffusion(DiffusionConfig(prediction="x0"))
    images = {}
    for device in ("cpu", "cuda"):
        images[device] = draw_samples(TorchBackend(model.to(device)), d, model.config, [0, 3, 7, 9],
                                      torch.Generator().manual_seed(0), sampler="dpm++2m", steps=5, cfg_scale=1.25,
                                      device=device)
    assert (images["cpu"] - images["cuda"]).abs().max().item() * 127.5 < 1.0


@needs_cuda
def test_sample_export_and_infer_trt_compare_from_a_cuda_checkpoint(tmp_path, capsys):
    import export
    import infer_trt
    import sample
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "20", "--out", out])
    ckpt = os.path.join(out, "ckpt.pt")
    sample.main(["--ckpt", ckpt, "--device", "cuda", "--labels", "7 seven 3", "--out", str(tmp_path / "g.png")])
    assert os.path.getsize(tmp_path / "g.png") > 0
    export.main(["--ckpt", ckpt, "--out-dir", str(tmp_path / "deploy"), "--batch-size", "4", "--max-batch", "16"])
    printed = capsys.readouterr().out
    assert "torch fp16 (cuda) vs fp32" in printed and "wrote" in printed
    infer_trt.main(["--onnx", str(tmp_path / "deploy" / "model.onnx"), "--backend", "ort", "--ckpt", ckpt,
                    "--device", "cuda", "--compare", "--num-samples", "8", "--out", str(tmp_path / "i.png")])
    printed = capsys.readouterr().out
    diff = float(printed.split("largest pixel difference ort vs torch: ")[1].split(" /")[0])
    assert diff < 2.0 and "torch on cuda" in printed
