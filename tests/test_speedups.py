"""tools/speedups.py and tools/bench.py: every wrapper computes what the eager model computes (fp32 exactly, bf16
within its precision), the FLOP counter matches a hand count, and bench.py runs end to end. Correctness
only: speed is bench.py's to show, never a test's. The two torch.compile tests take ~10-25 s each on
2 cores (Inductor compiles C++); CUDA-graph tests skip without a GPU."""
import contextlib
import copy
import io
import json

import pytest
import torch

import bench
import speedups
from support import UserError, run_cli
from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, DiTConfig

TINY = DiTConfig(image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, learn_sigma=True)
BF16_TOL = 0.05        # bf16 keeps 8 bits of mantissa: ~0.4 % per rounding, a few % through a network


def tiny_model(seed=0, config=TINY):
    """A tiny DiT with every weight random (a fresh DiT outputs exactly 0: adaLN-Zero would hide errors)."""
    torch.manual_seed(seed)
    model = DiT(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def inputs(n=3, config=TINY, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *config.image_shape, generator=g),
            torch.randint(0, 1000, (n,), generator=g), torch.randint(0, config.num_classes + 1, (n,), generator=g))


def relative_error(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------------------------
#                                      Inference wrappers
# ----------------------------------------------------------------------------------------------

def test_eager_fn_is_the_model():
    model = tiny_model()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
    out = speedups.eager_fn(model)(x, t, y)
    assert torch.equal(out, ref) and not out.requires_grad


def test_bf16_copy_matches_eager_within_bf16_precision():
    make = lambda m: speedups.low_precision_fn(m, torch.bfloat16)
    model = tiny_model()
    x, t, y = inputs()
    ref = speedups.eager_fn(model)(x, t, y)
    out = make(model)(x, t, y)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert 0 < relative_error(out, ref) < BF16_TOL           # really bf16 (not equal), and close
    assert next(model.parameters()).dtype == torch.float32   # the wrapper left the model itself alone


def test_compiled_fn_matches_eager_and_freezes_weights_into_onednn():
    model = tiny_model()
    x, t, y = inputs()
    ref = speedups.eager_fn(model)(x, t, y)
    fn = speedups.compiled_fn(model)
    assert torch.allclose(fn(x, t, y), ref, atol=1e-5, rtol=1e-4)
    # freezing is what makes compile pay on a CPU: the weights become pre-packed mkl/oneDNN linears.
    with torch.profiler.profile() as prof:
        fn(x, t, y)
    ops = {e.key for e in prof.key_averages()}
    assert any(k.startswith(("mkl::", "mkldnn::")) for k in ops), sorted(ops)
    low = speedups.compiled_fn(model, torch.bfloat16)(x, t, y)
    assert 0 < relative_error(low, ref) < BF16_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_fn_matches_eager_for_each_batch_size(dtype):
    model = tiny_model().cuda()
    fn = speedups.cuda_graph_fn(model, dtype)
    for n in (3, 5, 3):                                      # a new capture, then a replay of the first
        x, t, y = (v.cuda() for v in inputs(n, seed=n))
        ref = speedups.eager_fn(model)(x, t, y)
        out = fn(x, t, y)
        again = fn(x, t, y)
        assert out.dtype == torch.float32 and torch.equal(out, again)
        assert relative_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert len(fn.graphs) == 2


def test_default_low_precision_follows_the_hardware():
    expected = torch.bfloat16 if speedups.cpu_has_fast_bf16() else None
    assert speedups.default_low_precision("cpu") == expected


# ----------------------------------------------------------------------------------------------
#                                           Training
# ----------------------------------------------------------------------------------------------

def test_compiled_training_learns_exactly_what_eager_learns():
    """Same seed -> same dropped labels, same loss and same gradients with and without torch.compile."""
    config = DiTConfig(image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, class_dropout_prob=0.5)
    diffusion = GaussianDiffusion(DiffusionConfig(prediction="x0"))
    x0, _, y = inputs(8, config)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for compile in (False, True):
        model = tiny_model(config=config).train()
        fn = speedups.training_fn(model, compile=compile)
        torch.manual_seed(7)                                 # label dropout draws from the global generator
        loss = diffusion.training_loss(fn, x0, y, t=t, noise=noise)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    assert torch.allclose(loss_c, loss_e, rtol=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        assert torch.allclose(gc, ge, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
#                                     FLOPs and measuring
# ----------------------------------------------------------------------------------------------

def hand_count(c, n):
    """FLOPs of one DiT forward, 2 per multiply-add, read off dit.py layer by layer."""
    D, T, p, C = c.hidden_size, (c.image_size // c.patch_size) ** 2, c.patch_size, c.in_channels
    mlp = int(D * c.mlp_ratio)
    patch = 2 * T * (C * p * p) * D                          # the patchify conv
    timestep = 2 * (256 * D + D * D)                         # sin/cos features -> 2-layer MLP
    block = (2 * D * 6 * D                                   # adaLN: c -> 6 modulation vectors
             + 2 * T * D * 3 * D + 2 * T * D * D             # qkv and output projections
             + 2 * 2 * T * T * D                             # QK^T and attention x V, all heads together
             + 2 * 2 * T * D * mlp)                          # MLP up and down
    final = 2 * D * 2 * D + 2 * T * D * p * p * c.out_channels
    return n * (patch + timestep + c.depth * block + final)


def test_flop_counter_matches_hand_count_including_cpu_attention():
    model = tiny_model()
    assert speedups.count_flops(model, 5) == hand_count(TINY, 5)
    # torch's own counter skips the CPU attention kernel: ours must not.
    with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
        with torch.no_grad():
            model(*inputs(5))
    attention = 5 * TINY.depth * 4 * 16 * 16 * TINY.hidden_size
    assert plain.get_total_flops() == hand_count(TINY, 5) - attention


def test_training_flops_are_about_three_forwards():
    model = tiny_model().train()
    ratio = speedups.count_flops(model, 2, backward=True) / speedups.count_flops(model, 2)
    assert 2.9 < ratio <= 3.0      # backward = 2 matmuls per forward matmul (input and weight gradients)
    assert all(p.grad is None for p in model.parameters())


def test_interleaved_rotates_the_order_and_spread_summarises():
    order = []
    times = speedups.interleaved({k: (lambda k=k: order.append(k)) for k in "abc"}, 3, lambda: None)
    assert order == list("abcbcacab") and all(len(v) == 3 for v in times.values())
    assert speedups.spread([3.0, 1.0, 2.0], 10) == {"median": 20.0, "min": 10.0, "max": 30.0}


# ----------------------------------------------------------------------------------------------
#                                           bench.py
# ----------------------------------------------------------------------------------------------

def test_bench_quick_prints_every_table_and_writes_json(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main(["--quick", "--json", str(tmp_path / "bench.json")])
    text = out.getvalue()
    for needle in ("- machine: ", "torch 2", "- FLOPs per image", "- peak, best of 5", "| backend | batch | ms / evaluation "
                   "| evaluations/s | x eager | % of peak |", "DDPM-1000", "grey levels", "same digits (mean <= 1, max <= 32)", "Floor, counted FLOPs",
                   "| backend | images/s | s / step | x eager | % of peak | peak memory MiB | largest batch |",
                   "30000 steps at batch 8"):
        assert needle in text, needle
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["evaluations"]
    assert rows[0]["backend"] == "eager" and rows[0]["max_abs_diff"] == 0
    assert result["sampling"][0]["max_diff_levels"] == 0 and result["sampling"][0]["ddpm_how"] == "estimated"
    assert all(r["same_digits"] for r in result["sampling"])            # bf16 of a tiny net: within tolerance
    assert result["model"]["flops_forward"] == hand_count(bench.QUICK_MODEL, 1)
    assert all(r["ms_per_eval"]["min"] <= r["ms_per_eval"]["median"] <= r["ms_per_eval"]["max"] for r in rows)
    assert [r["backend"] for r in result["training"]] == ["eager"]
    assert all(r["peak_memory_bytes"] > 0 for r in result["training"])


def test_bench_bad_flags_are_one_line_errors(capsys):
    for argv, needle in ((["--quick", "--backends", "warp-drive"], "unknown row 'warp-drive'"),
                         (["--preset", "DiT-Q/3", "--backends", "none"], "unknown --preset"),
                         (["--quick", "--repeats", "0"], "argument --repeats: must be an integer > 0, got 0"),
                         (["--quick", "--batch-sizes", "x"], "argument --batch-sizes: expected an integer > 0, got 'x'"),
                         (["--quick", "--threads", "-1"], "argument --threads: must be an integer > 0, got -1")):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: bench.main(argv))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    with pytest.raises(UserError):
        bench.main(["--quick", "--train-backends", "nope"])
