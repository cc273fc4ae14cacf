"""train.py on real MNIST with a tiny model: the loss falls, checkpoints hold what resume needs,
resume continues the step count, log and grids are written, NaN and SIGTERM stop cleanly."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import support
import diffusion
import sample
import train

from conftest import MNIST, ROOT

TINY_MODEL = ["--hidden-size", "32", "--depth", "2", "--num-heads", "2"]    # a 2-block, width-32 DiT-T/4
TINY = ["--data-dir", MNIST, *TINY_MODEL, "--batch-size", "16", "--threads", "1", "--device", "cpu"]


def log_rows(out):
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


def test_loss_falls(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "120", "--warmup", "20", "--log-every", "10", "--out", out])
    losses = [float(r["loss"]) for r in log_rows(out)]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses      # x0-MSE falls from ~0.9 (predicting 0) to ~0.3 in 120 steps


def test_checkpoint_log_grid_and_resume(tmp_path):
    out = str(tmp_path / "run")
    args = [*TINY, "--log-every", "2", "--sample-every", "4", "--ckpt-every", "4", "--out", out]
    train.main([*args, "--steps", "6"])
    ckpt = load(out)
    assert ckpt["format"] == support.CHECKPOINT_FORMAT and ckpt["step"] == 6
    assert ckpt["model_config"]["hidden_size"] == 32 and ckpt["model_config"]["num_classes"] == 10
    assert ckpt["diffusion_config"]["prediction"] == "x0"
    assert ckpt["class_names"] == [str(i) for i in range(10)] and ckpt["dataset"] == "mnist"
    assert ckpt["args"]["steps"] == 6 and ckpt["args"]["depth"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert set(ckpt["ema"]) == set(ckpt["model"])
    assert not all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])  # EMA lags the weights
    assert ckpt["optimizer"]["state"][0]["step"].item() == 6
    assert isinstance(ckpt["rng"]["data"], torch.Tensor) and isinstance(ckpt["rng"]["ranks"][0]["torch"], torch.Tensor)
    assert [r["step"] for r in log_rows(out)] == ["2", "4", "6"]
    assert set(log_rows(out)[0]) == {"step", "loss", "lr", "images_per_s", "wall_time_s"}
    grids = sorted(os.listdir(os.path.join(out, "samples")))
    assert grids == ["step_0000004.png", "step_0000006.png"]
    assert Image.open(os.path.join(out, "samples", grids[-1])).size == (8 * 34 + 2, 10 * 34 + 2)   # a row per class
    # the checkpoint is what sample.py and friends read
    model, _, names, _ = sample.model_from_checkpoint(os.path.join(out, "ckpt.pt"))
    assert model.config.hidden_size == 32 and names[3] == "3"

    train.main([*args, "--steps", "10", "--resume", "auto"])
    resumed = load(out)
    assert resumed["step"] == 10 and resumed["optimizer"]["state"][0]["step"].item() == 10
    assert [r["step"] for r in log_rows(out)] == ["2", "4", "6", "8", "10"]
    assert float(log_rows(out)[-1]["wall_time_s"]) >= float(log_rows(out)[2]["wall_time_s"])


def test_nan_loss_stops_and_names_last_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = diffusion.GaussianDiffusion.training_loss, []

    def loss_that_explodes(self, *a, **k):
        calls.append(1)
        terms = real_loss(self, *a, **k)
        if len(calls) >= 7:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_loss", loss_that_explodes)
    out = str(tmp_path / "run")
    with pytest.raises(support.UserError, match=r"loss became nan at step 7; last good checkpoint: .*ckpt.pt \(step 5\)"):
        train.main([*TINY, "--steps", "20", "--ckpt-every", "5", "--out", out])
    ckpt = load(out)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_saves_checkpoint_and_exits_with_the_resume_command(tmp_path, signum):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--steps", "100000", "--log-every", "1000",
           "--ckpt-every", "1", "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "ckpt.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signum)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signum, output
    assert f"stopped by {signal.Signals(signum).name}" in output
    assert ("stopping after this step, with a checkpoint (Ctrl-C again to abort)" in output) == (signum == signal.SIGINT)
    assert output.rstrip().endswith(f"continue it with: python train.py {' '.join(TINY)} --steps 100000 --log-every "
                                    f"1000 --ckpt-every 1 --resume auto --out {out}"), output
    ckpt = load(out)
    assert 1 <= ckpt["step"] < 100000 and int(log_rows(out)[-1]["step"]) == ckpt["step"]   # the stop step is logged


@pytest.mark.parametrize("extra, message", [
    (["--model", "DiT-Q/4"], "unknown --model 'DiT-Q/4'"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA GPU"),
    (["--hidden-size", "30"], "hidden size 30 must be divisible by the 2 heads and by 4"),
    (["--image-size", "30"], "image size 30 is not divisible by patch size 4; change --image-size"),
])
def test_bad_flags_are_user_errors(tmp_path, extra, message):
    with pytest.raises(support.UserError, match=message.replace("(", r"\(")):
        train.main([*TINY, "--steps", "2", "--out", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "argument --steps: must be an integer > 0, got 0"),
    (["--batch-size", "-4"], "argument --batch-size: must be an integer > 0, got -4"),
    (["--lr", "nan"], "argument --lr: must be a number > 0, got nan"),
    (["--label-dropout", "1"], "argument --label-dropout: must be a number in [0, 1), got 1"),
    (["--grad-clip", "inf"], "argument --grad-clip: must be a number >= 0, got inf"),
])
def test_impossible_numbers_are_refused_by_the_parser(capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.endswith(f": error: {message}\n"), err


def test_unwritable_out_corrupt_and_mismatched_resume(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(support.UserError, match="cannot create run folder"):
        train.main([*TINY, "--steps", "2", "--out", str(blocker / "run")])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(support.UserError, match="corrupt.pt"):
        train.main([*TINY, "--steps", "2", "--out", str(tmp_path / "a"), "--resume", str(corrupt)])
    train.main([*TINY, "--steps", "2", "--out", str(tmp_path / "b")])
    with pytest.raises(support.UserError, match="another diffusion config.*prediction"):
        train.main([*TINY, "--steps", "4", "--out", str(tmp_path / "b"), "--resume", "auto", "--prediction", "eps"])


def test_batch_must_split_over_ranks(tmp_path):
    args = train.parse_args([*TINY, "--steps", "2", "--out", str(tmp_path / "run")])
    with pytest.raises(support.UserError, match="not divisible by the 3 DDP processes"):
        args = train.configure(args, world=3, device=torch.device("cpu"), say=print)


def test_cli_error_is_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--steps", "0", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr == "train.py: error: argument --steps: must be an integer > 0, got 0\n", \
        res.stderr


def test_lesson_recipe_sets_the_lesson_flags():
    args = train.parse_args(["--lesson-recipe"])
    assert (args.model, args.prediction, args.lr, args.warmup, args.label_dropout) == ("DiT-S/8", "eps", 2e-4, 0, 0.2)
    assert (args.timestep_sampling, args.batch_size) == ("uniform", 128)
    assert train.parse_args(["--lesson-recipe", "--lr", "1e-4"]).lr == 1e-4    # explicit flags still win
    # however typed: abbreviated, with =, or equal to the usual default (which the lesson's would replace)
    assert train.parse_args(["--lesson-recipe", "--pred", "x0"]).prediction == "x0"
    assert train.parse_args(["--lesson-recipe", "--batch-size=64"]).batch_size == 64
    assert train.parse_args(["--warmup", "200", "--lesson-recipe"]).warmup == 200
    assert train.parse_args([]).model is None and train.parse_args([]).prediction == "x0"


def test_learning_rate_warms_up_then_stays_constant():
    args = train.parse_args(["--lr", "1e-3", "--warmup", "100"])
    lr = lambda step: train.learning_rate(step, args.lr, args.warmup, 30_000, args.decay_steps)   # noqa: E731
    assert lr(0) == pytest.approx(1e-5) and lr(49) == pytest.approx(5e-4)
    assert lr(99) == lr(29_999) == 1e-3
    assert train.learning_rate(0, 1e-3, 0, 30_000, 0) == 1e-3


def test_decay_steps_let_the_learning_rate_fall_to_zero_at_the_last_step():
    lr = lambda step: train.learning_rate(step, 1e-3, 100, 1000, 200)                            # noqa: E731
    assert lr(0) == pytest.approx(1e-5) and lr(799) == 1e-3
    assert lr(800) == pytest.approx(1e-3) and lr(900) == pytest.approx(5e-4) and lr(999) == pytest.approx(5e-6)
    assert [lr(s) for s in range(800, 1000)] == sorted((lr(s) for s in range(800, 1000)), reverse=True)


def test_a_cpu_run_without_a_budget_trains_for_30_minutes(capsys):
    """A CPU's budget is its time: as many steps as fit, not the GPU's 30,000 (a long --max-minutes must not
    stop at 30,000 steps without a word)."""
    args = train.parse_args(["--device", "cpu"])
    args = train.configure(args, world=1, device=torch.device("cpu"), say=print)
    assert (args.model, args.batch_size, args.max_minutes, args.steps) == ("DiT-T/4", 32, 30, sys.maxsize)
    assert "no CUDA GPU: training the CPU model DiT-T/4 at batch 32 for 30 minutes" in capsys.readouterr().out
    args = train.configure(train.parse_args(["--max-minutes", "180"]), world=1, device=torch.device("cpu"), say=print)
    assert (args.max_minutes, args.steps) == (180, sys.maxsize)
    args = train.parse_args(["--steps", "500"])                        # a budget given: nothing added
    args = train.configure(args, world=1, device=torch.device("cpu"), say=print)
    assert (args.steps, args.max_minutes) == (500, None)


def test_progress_line_counts_steps_percent_and_time_left(tmp_path, capsys):
    train.main([*TINY, "--steps", "4", "--log-every", "2", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "step 2/4 (50%) | loss " in out and "step 4/4 (100%)" in out and " left" in out


def test_one_timestep_process_trains_and_samples(tmp_path):
    train.main([*TINY, "--steps", "3", "--num-timesteps", "1", "--out", str(tmp_path / "run")])
    assert load(str(tmp_path / "run"))["diffusion_config"]["num_timesteps"] == 1


def test_a_new_run_does_not_overwrite_an_old_one(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "2", "--out", out])
    with pytest.raises(support.UserError, match="ckpt.pt exists: this folder holds a run; continue it with --resume auto"):
        train.main([*TINY, "--steps", "4", "--out", out])
    other = str(tmp_path / "other")
    train.main([*TINY, "--steps", "1", "--out", other])
    with pytest.raises(support.UserError, match="this folder holds a run"):          # resuming another run into it
        train.main([*TINY, "--steps", "4", "--out", out, "--resume", os.path.join(other, "ckpt.pt")])
    train.main([*TINY, "--steps", "3", "--out", out, "--resume", os.path.join(out, "ckpt.pt")])   # its own: fine
    assert load(out)["step"] == 3


def test_resume_refuses_a_damaged_checkpoint_and_survives_a_garbage_log_row(tmp_path):
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "2", "--log-every", "1", "--out", out])
    with open(os.path.join(out, "log.csv"), "a") as f:
        f.write("garbage,,\n")
    train.main([*TINY, "--steps", "3", "--log-every", "1", "--out", out, "--resume", "auto"])
    assert [r["step"] for r in log_rows(out)] == ["1", "2", "3"]
    from test_bad_input import flip_a_weight_byte
    flip_a_weight_byte(os.path.join(out, "ckpt.pt"), os.path.join(out, "flipped.pt"))
    with pytest.raises(support.UserError, match="flipped.pt is damaged"):
        train.main([*TINY, "--steps", "4", "--out", str(tmp_path / "new"), "--resume", os.path.join(out, "flipped.pt")])


@pytest.mark.parametrize("argv, compiled", [
    (["--device", "cpu"], "on"), (["--steps", "5000"], "on"), (["--steps", "10", "--compile"], "on"),
    (["--steps", "500"], "off"), (["--max-minutes", "2"], "off"), (["--compile", "off"], "off")])
def test_compile_is_on_for_cpu_runs_long_enough_to_pay_back(argv, compiled):
    args = train.parse_args(argv)
    args = train.configure(args, world=1, device=torch.device("cpu"), say=print)
    assert args.compile == compiled


def test_without_a_cpp_compiler_auto_trains_eager_and_on_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(train, "cpp_compiler", lambda: None)
    args = train.parse_args(["--device", "cpu"])
    args = train.configure(args, world=1, device=torch.device("cpu"), say=print)
    assert args.compile == "off" and "no C++ compiler found for torch.compile" in capsys.readouterr().out
    with pytest.raises(support.UserError, match="--compile needs a C\\+\\+ compiler"):
        train.configure(train.parse_args(["--compile"]), world=1, device=torch.device("cpu"), say=print)


def test_snapshots_keep_the_checkpoint_at_each_minute_mark(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "3", "--snapshot-minutes", "0.00001,0.00002", "--out", out])
    snaps = sorted(f for f in os.listdir(out) if f.startswith("ckpt_"))
    assert snaps == ["ckpt_1e-05min.pt", "ckpt_2e-05min.pt"]
    steps = [support.load_checkpoint(os.path.join(out, f))["step"] for f in snaps]
    assert steps == [1, 2] and load(out)["step"] == 3     # one snapshot per step once its minute has passed
    with pytest.raises(SystemExit):
        train.parse_args(["--snapshot-minutes", "30,10"])
    assert "give increasing minutes" in capsys.readouterr().err


def test_images_per_s_counts_every_step_also_a_skipped_fp16_one(tmp_path, monkeypatch):
    """log.csv's images/s is batch x steps since the last row: a step whose fp16 loss was inf (skipped by the
    GradScaler) took as long as any other, so it counts; the mean loss is over the finite losses."""
    import types
    now = [100.0]
    monkeypatch.setattr(support.time, "time", lambda: now[0])
    s = types.SimpleNamespace(steps=10, batch_size=8, max_minutes=None, snapshot_minutes=None, log_every=4,
                              sample_every=0, ckpt_every=0)
    with support.TrainingRun(str(tmp_path), s, ckpt_path=str(tmp_path / "ckpt.pt"), step=0, t_start=100.0,
                             wall_before=0.0, world=1, device=torch.device("cpu"), rank=0, save=None, grid=None,
                             last_good="none", batch_rng=None) as run:
        for step, (loss, skipped) in enumerate(((0.5, False), (float("inf"), True), (0.3, False), (0.4, False)), 1):
            now[0] = 100.0 + step / 2                                # 4 steps in 2 s
            run.after_step(step, loss, 1e-3, skipped, fp16=True)
    (row,) = log_rows(str(tmp_path))
    assert float(row["images_per_s"]) == 8 * 4 / 2 and float(row["loss"]) == pytest.approx(0.4)
    assert "1 fp16 steps skipped" in run.note


def test_tf32_stays_inside_training_and_the_reference_is_true_fp32():
    """configure() leaves the process's TF32 flags alone (train.main turns TF32 on around train() only, on a
    GPU), and TorchBackend, every comparison's reference, computes in IEEE fp32 whatever the process set."""
    from sample import TorchBackend, tf32
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)     # noqa: E731
    before = flags()
    settings = train.parse_args(["--steps", "10"])
    train.configure(settings, 1, torch.device("cuda"), lambda *a: None)     # decides only: runs on a CPU too
    assert flags() == before
    with tf32(True):
        assert flags() == (True, True)
        seen = []

        class Probe(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(1))

            def forward(self, x, t, y):
                seen.append(flags())
                return x * self.w
        TorchBackend(Probe())(torch.ones(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        assert seen == [(False, False)] and flags() == (True, True)
    assert flags() == before


def test_a_checkpoint_written_before_a_key_was_renamed_loads_and_resumes(tmp_path, capsys):
    """DiffusionConfig.timesteps became timestep_sampling: files that hold the old name read under the new one,
    so old run folders resume and old models sample."""
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "2", "--out", out])
    path = os.path.join(out, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    for key in ("diffusion_config", "args"):
        ckpt[key] = {("timesteps" if k == "timestep_sampling" else k): v for k, v in ckpt[key].items()}
    state = {k: v for k, v in ckpt.items() if k not in ("format", "version", "sha256")}
    support.save_checkpoint(path, state)
    assert "timesteps" in torch.load(path, weights_only=True)["diffusion_config"]
    assert support.load_checkpoint(path)["diffusion_config"]["timestep_sampling"] == "uniform"
    train.main([*TINY, "--steps", "4", "--out", out, "--resume", "auto"])
    assert f"resumed {path} at step 2" in capsys.readouterr().out and load(out)["step"] == 4
