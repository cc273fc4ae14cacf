"""infer_trt.py on the tiny export of test_export.py: the ORT sampler against PyTorch,
the sidecar refusing stale or foreign files, the one-line errors of infer_trt.py, and (only where
TensorRT and a CUDA GPU exist) the engine end to end."""
import gc
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import support
import export
import fake_trt as fake
import infer_trt
import sample
from support import UserError
from sample import model_from_checkpoint
from test_export import cli_error, exported_tiny, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TRT = infer_trt.trt_unavailable_reason() is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return exported_tiny(tmp_path_factory)


def artifact(tiny, name="model.onnx"):
    return os.path.join(tiny["dir"], name)


def fake_engine(tiny, folder, **changes):
    """An engine file with a sidecar as export.py writes one; never deserialised (the checks come first)."""
    path = os.path.join(folder, "model_fp16.engine")
    with open(path, "wb") as f:
        f.write(b"not a real engine")
    meta = {k: v for k, v in support.load_sidecar(artifact(tiny, "model_fp16.onnx")).items()
            if k not in ("format", "version", "artifact", "artifact_sha256")}
    meta.update(kind="engine", gpu={"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]},
                profile={"min": 1, "opt": 32, "max": 256}, **changes)
    support.write_sidecar(path, meta)
    return path


def draw(fn, diffusion, config, sampler="ddim", device="cpu", steps=6, cfg_scale=2.0, seed=3):
    """A short fixed-seed sample of 4 images with guidance (so the model sees a doubled batch of 8)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 3, 7, 9])
    return diffusion.sample(fn, (4, 1, 16, 16), y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                            null_class=config.null_class, generator=g, device=device).cpu()


# ----------------------------------------------------------------------------------------------
#                                    Backends and sidecars
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ort_sample_equals_torch_sample(tiny, sampler):
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"])
    ort_fn = infer_trt.OrtBackend(artifact(tiny), ckpt_path=tiny["ckpt"])
    reference = draw(sample.TorchBackend(model), diffusion, model.config, sampler)
    images = draw(ort_fn, diffusion, model.config, sampler)
    assert images.shape == (4, 1, 16, 16) and images.abs().max() > 0.1
    assert (images - reference).abs().max().item() * 127.5 < 0.5       # < half a grey level of 255


def test_backend_call_contract(tiny):
    model, _, _, _ = model_from_checkpoint(tiny["ckpt"])
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 999]), torch.tensor([0, 10, 4])
    for fn in (sample.TorchBackend(model), infer_trt.open_backend("ort", artifact(tiny, "model_fp16.onnx"))):
        out = fn(x, t, y)
        assert out.dtype == torch.float32 and out.shape == (3, 2, 16, 16) and out.device == x.device


def test_sidecar_refuses_another_checkpoint(tiny, tmp_path):
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(UserError) as e:
        infer_trt.OrtBackend(artifact(tiny), ckpt_path=other)
    msg = str(e.value)
    assert tiny["ckpt"] in msg and other in msg and f"rerun `python export.py --ckpt {other}`" in msg


def test_sidecar_refuses_changed_missing_or_foreign_files(tiny, tmp_path):
    copy = str(tmp_path / "model.onnx")
    with pytest.raises(UserError, match="does not exist; run `python export.py"):
        support.load_sidecar(copy)
    shutil.copy(artifact(tiny), copy)
    with pytest.raises(UserError, match=r"model\.onnx\.json is missing"):
        support.load_sidecar(copy)
    shutil.copy(artifact(tiny) + ".json", copy + ".json")
    support.check_sidecar(support.load_sidecar(copy), copy)            # an intact copy is fine
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="differs from the file its sidecar describes"):
        infer_trt.OrtBackend(copy)
    with open(copy + ".json", "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="not a readable sidecar"):
        support.load_sidecar(copy)


def test_engine_sidecar_refuses_another_gpu(tiny, tmp_path):
    path = fake_engine(tiny, str(tmp_path))
    meta = support.load_sidecar(path)
    support.check_sidecar(meta, path, gpu_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(UserError, match=r"built for GPU 'NVIDIA H100 80GB HBM3', this machine has 'Tesla T4'"):
        support.check_sidecar(meta, path, gpu_name="Tesla T4")


def test_profile_check_message():
    meta = {"profile": {"min": 1, "opt": 32, "max": 256}}
    infer_trt.check_profile(meta, 1)
    infer_trt.check_profile(meta, 256)
    with pytest.raises(UserError) as e:
        infer_trt.check_profile(meta, 300)
    assert str(e.value).startswith("batch 300 is outside the engine's profile [1, 256]")
    assert str(e.value).endswith("rebuild with export.py --max-batch 300")


@pytest.mark.skipif(not NO_TRT, reason="TensorRT and a GPU are present here")
def test_without_tensorrt_nothing_touches_it():
    with pytest.raises(UserError, match=r"TensorRT is not installed|no CUDA GPU"):
        infer_trt.import_tensorrt()
    with pytest.raises(UserError, match="use --backend ort"):
        infer_trt.TrtBackend("missing.engine", meta={"model_config": {}})


# ----------------------------------------------------------------------------------------------
#                                        infer_trt.py
# ----------------------------------------------------------------------------------------------

def test_infer_ort_compare_and_same_images_as_sample_py(tiny, tmp_path, capsys):
    import sample
    png = str(tmp_path / "ort.png")
    infer_trt.main(["--onnx", artifact(tiny), "--backend", "ort", "--labels", "7 seven 3", "--steps", "5",
                    "--compare", "--out", png])
    out = capsys.readouterr().out
    assert os.path.isfile(png) and open(png[:-4] + ".txt").read() == "7 7 3\n"
    diff = float(out.split("largest pixel difference ort vs torch: ")[1].split(" /")[0])
    assert diff < 0.5 and "ms per network call" in out
    # The torch backend of infer_trt.py and sample.py draw the very same images from a seed.
    infer_trt.main(["--ckpt", tiny["ckpt"], "--backend", "torch", "--num-samples", "5", "--steps", "4",
                    "--batch-size", "2", "--out", str(tmp_path / "a.png")])
    sample.main(["--ckpt", tiny["ckpt"], "--num-samples", "5", "--steps", "4", "--batch-size", "2",
                 "--out", str(tmp_path / "b.png")])
    assert open(tmp_path / "a.png", "rb").read() == open(tmp_path / "b.png", "rb").read()


@pytest.mark.skipif(not NO_TRT, reason="TensorRT and a GPU are present here")
def test_infer_trt_requested_without_tensorrt_is_one_line(tiny):
    """A real process: exit status 2 and exactly the one line, no traceback."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "infer_trt.py"), "--onnx", artifact(tiny),
                        "--backend", "trt"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() in (
        "infer_trt.py: error: TensorRT is not installed (pip install -r requirements-gpu.txt on a CUDA machine); "
        "use --backend ort",
        "infer_trt.py: error: no CUDA GPU is available, and TensorRT needs one; use --backend ort")


def test_infer_bad_input_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    assert "does not exist" in cli_error(capsys, infer_trt.main, ["--onnx", str(tmp_path / "nope.onnx"),
                                                                  "--backend", "ort"])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = cli_error(capsys, infer_trt.main, ["--onnx", artifact(tiny), "--out", str(blocker / "x.png")])
    assert "error: cannot write to" in err and "a_file: it is a file, not a folder" in err
    assert "unknown label 'eleven'" in cli_error(capsys, infer_trt.main, ["--onnx", artifact(tiny), "--labels", "eleven"])
    other = make_checkpoint(tmp_path / "other.pt", seed=2)
    err = cli_error(capsys, infer_trt.main, ["--onnx", artifact(tiny), "--ckpt", other])
    assert "was exported from checkpoint" in err and "rerun `python export.py --ckpt" in err

    # The engine checks come before TensorRT is touched: pretend it is usable to reach them on a CPU.
    monkeypatch.setattr(infer_trt, "trt_unavailable_reason", lambda: None)
    monkeypatch.setattr(infer_trt, "pick_device", lambda name: torch.device("cuda"))
    engine = fake_engine(tiny, str(tmp_path))
    err = cli_error(capsys, infer_trt.main, ["--engine", engine, "--backend", "trt", "--ckpt", other])
    assert "model_fp16.engine was exported from checkpoint" in err
    monkeypatch.setattr(infer_trt, "current_gpu_name", lambda device="cuda": "Tesla T4")
    err = cli_error(capsys, infer_trt.main, ["--engine", engine, "--backend", "trt"])
    assert "built for GPU 'NVIDIA H100 80GB HBM3', this machine has 'Tesla T4'" in err
    os.remove(engine)
    assert "model_fp16.engine does not exist" in cli_error(capsys, infer_trt.main, ["--engine", engine,
                                                                                    "--backend", "trt"])


# ----------------------------------------------------------------------------------------------
#                          TensorRT end to end (GPU + TensorRT only)
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(NO_TRT, reason="needs TensorRT and a CUDA GPU (infer_trt.trt_unavailable_reason())")
def test_tensorrt_engine_end_to_end(tiny, tmp_path, capsys):
    onnx_path = artifact(tiny, "model_fp16.onnx")
    engine, cache = str(tmp_path / "model_fp16.engine"), str(tmp_path / "model_fp16.timing.cache")
    version = export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16), opt_level=1)
    assert os.path.getsize(engine) > 0 and os.path.getsize(cache) > 0
    meta = {k: v for k, v in support.load_sidecar(onnx_path).items()
            if k not in ("format", "version", "artifact", "artifact_sha256")}
    support.write_sidecar(engine, {**meta, "kind": "engine", "versions": {"tensorrt": version},
                                    "gpu": {"name": infer_trt.current_gpu_name()},
                                    "profile": {"min": 1, "opt": 8, "max": 16}})
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"], "cuda")
    torch_fn = sample.TorchBackend(model)
    plain = infer_trt.TrtBackend(engine, ckpt_path=tiny["ckpt"])
    graphed = infer_trt.TrtBackend(engine, cuda_graph=True)
    rows = export.parity(torch_fn, plain, model.config, diffusion.num_timesteps, batch_sizes=(1, 7, 16))
    assert all(r["rel"] < 1e-2 for r in rows), rows
    x, t, y = (v.cuda() for v in export.random_inputs(model.config, 1000, 5, torch.Generator().manual_seed(0)))
    first = graphed(x, t, y)
    gc.collect()                                   # the graph's execution context must survive this
    assert torch.equal(first, plain(x, t, y)) and torch.equal(graphed(x, t, y), first)   # replays, same answer
    torch.cuda.synchronize()
    views = [torch.cat([v, v])[1:6] for v in (x, t, y)]                   # contiguous, at an unaligned offset
    assert views[1].data_ptr() % 256 and torch.equal(plain(*views), graphed(*views))   # t: 8 bytes in
    with pytest.raises(UserError, match=r"batch 17 is outside the engine's profile \[1, 16\]"):
        plain(*(torch.cat([v] * 4)[:17] for v in (x, t, y)))
    images = draw(plain, diffusion, model.config, device="cuda")
    assert (images - draw(torch_fn, diffusion, model.config, device="cuda")).abs().max().item() * 127.5 < 10


#              TrtBackend and build_engine on a fake TensorRT and a fake CUDA (tests/fake_trt.py)
# ----------------------------------------------------------------------------------------------
# The fakes follow the real bindings' contracts (each cited in fake_trt.py): an engine holds no reference
# to its contexts, a graph replayed after its context is gone is an illegal memory access, unaligned
# addresses and shapes outside the profile are refused with False, execute_async_v3 returns False with
# an unset shape or address, an unreadable timing cache is None, a failed build is None.

PROFILE = (1, 4, 8)


@pytest.fixture()
def fake_trt(tmp_path, monkeypatch):
    cuda = fake.FakeCuda()

    def make(cuda_graph, streams_weights=False, **options):
        cuda.install(monkeypatch)
        trt = fake.fake_tensorrt(cuda, **options)
        monkeypatch.setattr(infer_trt, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(infer_trt, "_TRT_LOGGER", [])
        (tmp_path / "fake.engine").write_bytes(fake.plan_bytes((1, 4, 4), PROFILE, streams_weights))
        backend = infer_trt.TrtBackend(str(tmp_path / "fake.engine"), cuda_graph=cuda_graph, meta={"profile": {}})
        backend.device = torch.device("cpu")            # the fake computes on host memory
        return backend, cuda.events, trt.runtimes[0]
    make.cuda = cuda
    return make


def inputs(n):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.zeros(n, dtype=torch.long)


def expected(x, t):
    return 2 * x + t.float().view(-1, 1, 1, 1)


def test_trt_backend_plain_call_orders_streams_and_sets_shapes_first(fake_trt):
    backend, events, _ = fake_trt(cuda_graph=False)
    x, t, y = inputs(3)
    events.clear()
    out = backend(x, t, y)
    assert torch.equal(out, expected(x, t))
    side = backend.stream.cuda_stream
    kinds = [e[0] for e in events]
    assert events[0] == ("wait", side, 0)                        # the side stream waits for the inputs
    assert kinds.index("execute") > max(i for i, k in enumerate(kinds) if k in ("shape", "address"))
    assert ("execute", 0, side, False) in events                 # enqueued on the side stream, not stream 0
    assert kinds.count("record") == 4 and events[-1] == ("wait", 0, side)   # main waits for the result
    assert [e[2:] for e in events if e[0] == "shape"] == [("x", (3, 1, 4, 4)), ("t", (3,)), ("y", (3,))]


def test_trt_backend_refuses_a_batch_outside_the_profile_before_any_call(fake_trt):
    backend, events, _ = fake_trt(cuda_graph=False)
    events.clear()
    with pytest.raises(UserError, match=r"batch 9 is outside the engine's profile \[1, 8\]"):
        backend(*inputs(9))
    assert events == []


def test_trt_backend_cuda_graphs_warm_up_then_capture_once_per_batch(fake_trt):
    backend, events, trt_runtime = fake_trt(cuda_graph=True)
    side = backend.stream.cuda_stream
    for n in (2, 2, 5):
        x, t, y = inputs(n)
        assert torch.equal(backend(x, t, y), expected(x, t))
    kinds = [e[0] for e in events]
    assert kinds.count("capture") == 2 and kinds.count("replay") == 3
    assert trt_runtime.contexts_made == 3                                   # 1 plain + 1 per batch size
    first = kinds.index("capture")
    shapes = [i for i, e in enumerate(events) if e[0] == "shape" and e[1] == 1]
    warm = events.index(("execute", 1, side, False))
    assert max(shapes) < warm < first < events.index(("execute", 1, side, True))   # shapes, warm-up, capture
    assert events[first][:2] == ("capture", side) and ("sync", side) in events[warm:first]


def test_trt_backend_keeps_each_graphs_context_alive(fake_trt):
    """The engine holds no reference to its contexts: the graph's must live as long as the graph, or every
    replay writes into freed activation memory (an illegal memory access, sticky for the process)."""
    backend, _, trt_runtime = fake_trt(cuda_graph=True)
    x, t, y = inputs(4)
    backend(x, t, y)                      # capture
    gc.collect()
    assert all(ref() is not None for ref in trt_runtime.made), "a context was freed while its graph lives"
    for _ in range(3):                    # replays
        assert torch.equal(backend(x, t, y), expected(x, t))
    del backend
    gc.collect()
    assert all(ref() is None for ref in trt_runtime.made)      # and nothing else holds them


def test_trt_backend_captures_in_thread_local_mode(fake_trt):
    backend, events, _ = fake_trt(cuda_graph=True)
    backend(*inputs(2))
    assert [e[2] for e in events if e[0] == "capture"] == ["thread_local"]    # as trtexec does


def test_fake_graph_replay_after_its_context_is_gone_fails_loudly(fake_trt):
    """Guards the fake: a graph whose context was freed fails like the real thing, and CUDA stays broken."""
    backend, _, _ = fake_trt(cuda_graph=True)
    x, t, y = inputs(2)
    backend(x, t, y)
    graph, static, out, run = backend.graphs.graphs[((2, 1, 4, 4), (2,), (2,))]
    backend.graphs.graphs[((2, 1, 4, 4), (2,), (2,))] = (graph, static, out, None)
    del run
    with pytest.raises(UserError, match="replaying a CUDA graph failed .*illegal memory access.*rerun without "
                                        "--cuda-graph"):
        backend(x, t, y)
    with pytest.raises(fake.CudaError, match="illegal memory access"):
        fake_trt.cuda.current.synchronize()


def test_trt_backend_falls_back_when_the_engine_cannot_be_captured(fake_trt, capsys):
    """An engine that streams weights enqueues synchronously: execute_async_v3 fails under capture."""
    backend, _, _ = fake_trt(cuda_graph=True, streams_weights=True)
    x, t, y = inputs(2)
    assert torch.equal(backend(x, t, y), expected(x, t))
    assert backend.graphs is None and "CUDA graph capture of the engine failed" in capsys.readouterr().err


def test_a_replay_error_is_not_reported_as_a_capture_failure(fake_trt, capsys):
    backend, _, _ = fake_trt(cuda_graph=True)
    x, t, y = inputs(2)
    backend(x, t, y)
    fake_trt.cuda.broken = "unspecified launch failure"
    with pytest.raises(UserError, match="replaying a CUDA graph failed .*unspecified launch failure"):
        backend(x, t, y)
    assert backend.graphs is not None and "capture" not in capsys.readouterr().err


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_backend_binds_aligned_copies_of_views_at_an_offset(fake_trt, cuda_graph):
    """TensorRT needs 256-byte aligned addresses: contiguous views at an offset are copied, never bound."""
    backend, _, _ = fake_trt(cuda_graph=cuda_graph)
    x, t, y = inputs(9)
    for view in ((x[1:], t[1:], y[1:]), (x[3:7], t[3:7], y[3:7])):
        assert torch.equal(backend(*view), expected(view[0], view[1]))
    assert infer_trt.aligned(x[1:]).data_ptr() % 256 == 0 and torch.equal(infer_trt.aligned(x[1:]), x[1:])
    for dtype in (torch.float16, torch.float32, torch.int64):
        assert infer_trt.empty_aligned((3, 5), dtype, "cpu").data_ptr() % 256 == 0


def test_trt_backend_checks_every_address_it_binds(fake_trt, monkeypatch):
    backend, _, _ = fake_trt(cuda_graph=False)
    monkeypatch.setattr(infer_trt, "aligned", lambda v: v)       # as if the copy were skipped
    x, t, y = inputs(9)
    with pytest.raises(UserError, match=r"TensorRT refused the address of (x|t|y) .*aligned to 256 bytes"):
        for start in range(1, 9):                              # some view is unaligned for certain
            backend(x[start:], t[start:], y[start:])


def test_trt_backend_says_when_no_context_can_be_made(fake_trt):
    with pytest.raises(UserError, match="could not create an execution context"):
        fake_trt(cuda_graph=False, fail_contexts=True)


def test_fake_execute_refuses_unset_shapes_and_addresses(fake_trt):
    """Guards the fake: enqueueV3 returns False, as documented, until every shape and address is set."""
    backend, _, _ = fake_trt(cuda_graph=False)
    context = backend.engine.create_execution_context()
    assert context.execute_async_v3(1) is False
    x = infer_trt.empty_aligned((2, 1, 4, 4), torch.float32, "cpu")
    assert context.set_input_shape("x", (2, 1, 4, 4)) and context.set_tensor_address("x", x.data_ptr())
    assert not context.set_input_shape("x", (9, 1, 4, 4)) and not context.set_input_shape("x", (2, 3, 4, 4))
    assert not context.set_tensor_address("t", x.data_ptr() + 4)
    assert context.execute_async_v3(1) is False
    assert backend.engine.get_tensor_profile_shape("x", 0)[2] == (8, 1, 4, 4)


def test_fakes_use_only_names_of_the_real_tensorrt():
    """Every method and property of the fake classes exists on the real 11.4 class it stands for."""
    with open(os.path.join(ROOT, "tests", "tensorrt-11.4.0.106-api.json")) as f:
        api = json.load(f)["classes"]
    missing = [f"{real}.{name}" for cls, real in fake.REAL_NAMES.items() for name, value in vars(cls).items()
               if not name.startswith("_") and (callable(value) or isinstance(value, property))
               and name not in api[real]["members"]]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------

def engine_inputs(tmp_path, tiny):
    onnx_path = artifact(tiny, "model_fp16.onnx")
    return onnx_path, str(tmp_path / "model_fp16.engine"), str(tmp_path / "model_fp16.timing.cache")


def install_builder(monkeypatch, **options):
    trt = fake.fake_tensorrt(**options)
    monkeypatch.setattr(export, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(infer_trt, "_TRT_LOGGER", [])
    return trt


def test_build_engine_writes_the_engine_and_a_timing_cache_it_reuses(tiny, tmp_path, monkeypatch, capsys):
    install_builder(monkeypatch)
    onnx_path, engine, cache = engine_inputs(tmp_path, tiny)
    assert export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16)) == "11.4.0.106-fake"
    plan = open(engine, "rb").read()
    assert plan.startswith(fake.PLAN_MAGIC) and open(cache, "rb").read().startswith(fake.CACHE_MAGIC)
    export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16))
    assert "timing cache" not in capsys.readouterr().out                    # the saved cache was read back


@pytest.mark.parametrize("blob,why", [(b"\x00garbage from an older TensorRT", "unreadable"),
                                      (fake.ITimingCache("Other GPU").serialize(), "another GPU")])
def test_build_engine_starts_a_new_timing_cache_when_the_old_one_cannot_be_used(tiny, tmp_path, monkeypatch,
                                                                               capsys, blob, why):
    install_builder(monkeypatch)
    onnx_path, engine, cache = engine_inputs(tmp_path, tiny)
    with open(cache, "wb") as f:
        f.write(blob)
    export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16))
    assert "cannot be used (damaged, or made by another GPU or TensorRT version): starting a new timing cache" \
        in capsys.readouterr().out
    assert os.path.getsize(engine) > 0 and fake.GPU in open(cache, "rb").read().decode()   # replaced by a good one


def test_build_engine_failures_are_one_line(tiny, tmp_path, monkeypatch):
    onnx_path, engine, cache = engine_inputs(tmp_path, tiny)
    install_builder(monkeypatch, fail_build=True)
    with pytest.raises(UserError, match="TensorRT could not build an engine from .*model_fp16.onnx"):
        export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16))
    assert not os.path.exists(engine)
    install_builder(monkeypatch)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match=r"TensorRT cannot parse .*junk.onnx: Failed to parse ONNX model"):
        export.build_engine(str(tmp_path / "junk.onnx"), engine, cache, (1, 16, 16), (1, 8, 16))


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_an_engine_built_by_build_engine_computes_in_fp16_and_passes_the_engine_check(tiny, tmp_path, monkeypatch,
                                                                                      cuda_graph):
    """The fake engine computes the fp16 graph it was built from in fp16 arithmetic: TrtBackend returns exactly
    that, and export's engine check of it against PyTorch fp32 passes with fp16's rounding, not zero."""
    install_builder(monkeypatch)
    onnx_path, engine, cache = engine_inputs(tmp_path, tiny)
    export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16))
    cuda = fake.FakeCuda()
    cuda.install(monkeypatch)
    trt = fake.fake_tensorrt(cuda)
    monkeypatch.setattr(infer_trt, "import_tensorrt", lambda: trt)
    backend = infer_trt.TrtBackend(engine, cuda_graph=cuda_graph, meta={"profile": {}})
    backend.device = torch.device("cpu")
    assert backend.meta["profile"] == {"min": 1, "max": 16}
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"])
    x, t, y = export.random_inputs(model.config, 1000, 5, torch.Generator().manual_seed(0))
    assert torch.equal(backend(x, t, y), export.fp16_graph(onnx_path)(x, t, y))
    rows, ddim = export.check_engine(sample.TorchBackend(model), backend, diffusion, model.config, 16, 2, 0,
                                            "cpu")
    assert [r["batch"] for r in rows] == [1, 7, 16]
    assert all(1e-5 < r["image_rel_l2"] <= export.FP16_TOLERANCE for r in rows), rows


def test_a_cuda_driver_too_old_for_tensorrt_is_one_line_and_auto_falls_back(tiny, tmp_path, monkeypatch, capsys):
    """tensorrt imports, but its Runtime and Builder factories return nullptr (a driver older than its CUDA):
    one line naming the mismatch, --backend auto runs ONNX Runtime, and export skips the engine."""
    package = tmp_path / "site" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import fake_trt\n"
                                         "globals().update(vars(fake_trt.fake_tensorrt(driver_too_old=True)))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(infer_trt, "_TRT_LOGGER", [])
    reason = infer_trt.trt_unavailable_reason()
    assert reason.startswith("TensorRT 11.4.0.106-fake cannot start on this machine's CUDA driver, which PyTorch")
    assert fake.NULLPTR in reason and "R580" in reason and "tensorrt-cu12==11.4.*" in reason and "\n" not in reason
    folder = str(tmp_path / "deploy")
    shutil.copytree(tiny["dir"], folder)
    open(os.path.join(folder, "model_fp16.engine"), "wb").close()
    args = infer_trt.parse_args(["--engine", os.path.join(folder, "model_fp16.engine")])
    assert infer_trt.choose_backend(args) == ("ort", os.path.join(folder, "model.onnx"))
    assert "note: not using the engine (TensorRT 11.4.0.106-fake cannot start" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot start on this machine's CUDA driver"):
        infer_trt.import_tensorrt()
    # Where a caller holds the module already, the builder and the runtime say the same in one line.
    trt = fake.fake_tensorrt(driver_too_old=True)
    monkeypatch.setattr(export, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(infer_trt, "import_tensorrt", lambda: trt)
    onnx_path, engine, cache = engine_inputs(tmp_path, tiny)
    with pytest.raises(UserError, match="cannot start on this machine's CUDA driver"):
        export.build_engine(onnx_path, engine, cache, (1, 16, 16), (1, 8, 16))
    with pytest.raises(UserError, match="cannot start on this machine's CUDA driver"):
        infer_trt.TrtBackend(os.path.join(folder, "model_fp16.engine"), meta={"profile": {}})
    assert not os.path.exists(engine)


def test_compare_reports_the_steady_state_apart_from_the_first_calls():
    """A first call per batch size that captures a graph (slow) must not be averaged into ms per call."""
    import time
    calls = []

    def fn(x, t, y):
        time.sleep(0.3 if x.shape[0] not in calls else 0.005)
        calls.append(x.shape[0])
        return x
    timed = infer_trt.Timed(fn, "cpu")
    for n in (4,) * 10 + (2,) * 5:
        timed(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    assert timed.ms_per_call < 50 and timed.ms_once > 450


# ----------------------------------------------------------------------------------------------

class ProfileBound:
    """A backend that, like an engine, accepts only batch sizes inside its profile [1, max_batch]."""

    def __init__(self, fn, max_batch):
        self.fn, self.meta, self.batches = fn, {"profile": {"min": 1, "max": max_batch}}, set()

    def __call__(self, x, t, y):
        infer_trt.check_profile(self.meta, x.shape[0])
        self.batches.add(x.shape[0])
        return self.fn(x, t, y)


@pytest.mark.parametrize("batch_size,max_batch", [(4, 8), (1, 2), (3, 7), (2, 15), (32, 256)])
def test_the_engine_check_stays_inside_the_profile_export_accepts(tiny, batch_size, max_batch, capsys):
    """Every --batch-size/--max-batch export.py accepts builds an engine its own check can run."""
    args = export.parse_args(["--ckpt", tiny["ckpt"], "--batch-size", str(batch_size), "--max-batch", str(max_batch)])
    model, diffusion, _, _ = model_from_checkpoint(tiny["ckpt"])
    torch_fn = sample.TorchBackend(model)
    engine_fn = ProfileBound(torch_fn, args.max_batch)
    rows, ddim = export.check_engine(torch_fn, engine_fn, diffusion, model.config, args.max_batch, 2, 0, "cpu")
    assert max(engine_fn.batches) == max_batch and ddim["uint8"] == 0 and all(r["rel"] == 0 for r in rows)


# ----------------------------------------------------------------------------------------------

def test_auto_backend_falls_back_when_tensorrt_is_found_but_does_not_import(tiny, tmp_path, monkeypatch, capsys):
    """A tensorrt package whose libraries are missing: found by find_spec, fails at import."""
    package = tmp_path / "site" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('libnvonnxparser.so.11: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = infer_trt.trt_unavailable_reason()
    assert reason.startswith("TensorRT is installed but does not import (libnvonnxparser.so.11")
    folder = str(tmp_path / "deploy")
    shutil.copytree(tiny["dir"], folder)
    open(os.path.join(folder, "model_fp16.engine"), "wb").close()
    args = infer_trt.parse_args(["--engine", os.path.join(folder, "model_fp16.engine")])
    backend, path = infer_trt.choose_backend(args)
    assert backend == "ort" and path == os.path.join(folder, "model.onnx")
    assert "not using the engine (TensorRT is installed but does not import" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not import .*use --backend ort"):
        infer_trt.import_tensorrt()


def test_a_failed_capture_gives_the_callers_stream_back(fake_trt):
    """torch.cuda.graph raises from capture_end before switching the stream back: the caller's must return."""
    backend, _, _ = fake_trt(cuda_graph=True, streams_weights=True)
    main = fake_trt.cuda.current
    backend(*inputs(2))
    assert backend.graphs is None and fake_trt.cuda.current is main


def test_fake_capture_breaks_on_a_synchronize_and_runs_other_streams_at_once(fake_trt):
    """Guards the fake: [cu] synchronizing the capturing stream invalidates the capture, and work enqueued
    on another stream during a capture runs at once instead of being recorded."""
    backend, events, _ = fake_trt(cuda_graph=False)
    cuda = fake_trt.cuda
    main = cuda.current
    x, t, y = inputs(2)
    graph, other = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.graph(graph, stream=other):
        assert torch.equal(backend(x, t, y), expected(x, t))         # on backend.stream: not captured
    assert graph.kernels == [] and ("execute", 0, backend.stream.cuda_stream, False) in events
    assert cuda.current is main
    with pytest.raises(fake.CudaError, match="previous error during capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=other):
            with pytest.raises(fake.CudaError, match="not permitted when stream is capturing"):
                other.synchronize()
    assert cuda.current is other                     # as torch leaves it: capture_end raised first


def test_ort_and_torch_backends_never_import_tensorrt(tiny, monkeypatch):
    """Only --backend trt or auto looks for TensorRT (importing it where a GPU exists)."""
    def forbidden():
        raise AssertionError("TensorRT looked up for a backend that does not use it")
    monkeypatch.setattr(infer_trt, "trt_unavailable_reason", forbidden)
    assert infer_trt.choose_backend(infer_trt.parse_args(["--onnx", artifact(tiny), "--backend", "ort"]))[0] == "ort"
    assert infer_trt.choose_backend(infer_trt.parse_args(["--ckpt", tiny["ckpt"], "--backend", "torch"]))[0] == "torch"
