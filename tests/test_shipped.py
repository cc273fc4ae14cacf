"""The trained model the repository ships (checkpoints/dit-t4-mnist.pt) and the scripts' use of it when
--ckpt is not given: the README's Quick start, run as a user runs it, in any clone."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import support
import export
import infer_trt
import plot_curve
import sample
import ship_checkpoint
import train
from mnist_cnn import classify, load_classifier

from conftest import ROOT
from test_train import TINY

SHIPPED = os.path.join(ROOT, "checkpoints", "dit-t4-mnist.pt")


def run(main, argv):
    """main(argv) -> (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(argv)
    return out.getvalue(), err.getvalue()


def test_the_shipped_model_is_sampling_only_and_carries_its_record():
    assert support.SHIPPED_CKPT == SHIPPED and os.path.getsize(SHIPPED) < 10e6
    ckpt = support.load_checkpoint(SHIPPED)                      # checksummed
    assert ckpt["sampling_only"] and "optimizer" not in ckpt and "ema" not in ckpt
    assert ckpt["class_names"] == [str(d) for d in range(10)] and ckpt["dataset"] == "mnist"
    record = ckpt["training"]
    assert record["command"].startswith("python train.py") and record["steps"] == ckpt["step"] > 0
    assert record["images_seen"] == record["steps"] * record["batch_size"] and record["wall_time_min"] >= 90
    # It carries the score of the sampler it is sampled with by default, and an unguided one.
    default = (support.DEFAULT_SAMPLER, support.DEFAULT_STEPS, support.DEFAULT_CFG,
               support.DEFAULT_LOWER_ORDER_FINAL)
    scored = {(s["sampler"], s["steps"], s["cfg_scale"], bool(s.get("lower_order_final"))) for s in ckpt["scores"]}
    assert default in scored and any(cfg == 1 for _, _, cfg, _ in scored)
    assert all(s["n"] == 10_000 for s in ckpt["scores"])


def test_sample_without_ckpt_draws_the_prompt_grid_from_the_shipped_model(tmp_path, monkeypatch):
    """The Quick start's first command; the digits must be the labels asked for (the scoring CNN reads them)."""
    monkeypatch.chdir(tmp_path)
    labels = "2 4 one nine 2 eight 7 9 0 1 3 5 6 seven"
    out, err = run(sample.main, ["--labels", labels, "--out", "runs/grid.png", "--nrow", "7"])
    assert "no --ckpt given: using the shipped model" in err and err.count("\n") == 1
    grid = np.asarray(Image.open(tmp_path / "runs" / "grid.png").convert("L"))
    assert grid.shape == (2 * 34 + 2, 7 * 34 + 2)              # save_grid: 32 px cells, 2 px padding
    cells = [grid[2 + 34 * r: 34 + 34 * r, 2 + 34 * c: 34 + 34 * c] for r in range(2) for c in range(7)]
    classifier, _ = load_classifier(os.path.join(ROOT, "tools", "mnist_cnn.pt"))
    read = classify(classifier, torch.from_numpy(np.stack(cells))[:, None])[0].argmax(1).tolist()
    assert read == [2, 4, 1, 9, 2, 8, 7, 9, 0, 1, 3, 5, 6, 7]


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory):
    """`python export.py` at its defaults (but 2 DDIM steps in its sampling check), run in a fresh working
    folder -> (folder, stdout, stderr)."""
    folder, before = tmp_path_factory.mktemp("work"), os.getcwd()
    os.chdir(folder)
    try:
        out, err = run(export.main, ["--verify-steps", "2"])
    finally:
        os.chdir(before)
    return folder, out, err


def test_export_and_infer_without_ckpt_use_the_shipped_model_outside_the_repository(shipped_export, monkeypatch):
    """python export.py writes runs/shipped/ in the working folder (never into checkpoints/), and
    python infer_trt.py --compare finds those files and the shipped weights."""
    tmp_path, out, err = shipped_export
    monkeypatch.chdir(tmp_path)
    assert "shipped model" in err and os.path.isfile(tmp_path / "runs" / "shipped" / "model.onnx")
    assert sorted(os.listdir(os.path.dirname(SHIPPED))) == ["dit-t4-mnist.pt"]
    with open(tmp_path / "runs" / "shipped" / "model.onnx.json") as f:
        assert json.load(f)["checkpoint"]["path"] == SHIPPED
    out, err = run(infer_trt.main, ["--backend", "ort", "--num-samples", "4", "--compare", "--out", "runs/i.png"])
    assert out.startswith("ort (") and "largest pixel difference ort vs torch" in out
    assert "tolerance 1 / 255: PASS" in out and "ema weights of " + SHIPPED in out and "warning" not in err


def test_the_engine_check_passes_the_shipped_model_at_export_defaults(shipped_export):
    """The engine's arithmetic without TensorRT: the fp16 graph export wrote, computed in fp16, as the engine
    in export's own engine check, at its default --max-batch (256) and inputs. It passes, and export's CPU
    check had already measured the very same errors on the same inputs."""
    from sample import TorchBackend
    from infer_trt import check_profile
    folder, _, _ = shipped_export
    args = export.parse_args([])
    model, diffusion, _, _ = sample.model_from_checkpoint(SHIPPED)
    path = str(folder / "runs" / "shipped" / "model_fp16.onnx")
    graph, batches = export.fp16_graph(path), []

    def engine(x, t, y):                      # inside the profile [1, --max-batch] export builds the engine with
        check_profile({"profile": {"min": 1, "max": args.max_batch}}, x.shape[0])
        batches.append(x.shape[0])
        return graph(x, t, y)
    rows, ddim = export.check_engine(TorchBackend(model), engine, diffusion, model.config, args.max_batch,
                                            args.verify_steps, args.seed, device="cpu")
    assert max(batches) == args.max_batch == 256 and [r["batch"] for r in rows] == [1, 7, 256]
    assert all(r["image_rel_l2"] <= export.FP16_TOLERANCE for r in rows), rows
    recorded = support.load_sidecar(path)["checks"]["fp16_arithmetic_vs_torch"]
    assert [r["image_rel_l2"] for r in recorded] == [r["image_rel_l2"] for r in rows]
    assert ddim["float"] < 8


def test_resume_and_raw_weights_refuse_a_sampling_only_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        support.run_cli(lambda: train.main([*TINY, "--steps", "2", "--resume", SHIPPED, "--out", out]))
    err = capsys.readouterr().err
    assert "is a sampling-only checkpoint" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        support.run_cli(lambda: sample.main(["--no-ema", "--num-samples", "1", "--out", str(tmp_path / "g.png")]))
    assert "holds the EMA weights only" in capsys.readouterr().err


def test_ship_checkpoint_keeps_the_ema_weights_the_record_and_the_scores(tmp_path):
    run_dir = str(tmp_path / "run")
    train.main([*TINY, "--steps", "3", "--out", run_dir])
    score = tmp_path / "score.json"
    score.write_text(json.dumps({"sampler": "ddim", "steps": 50, "cfg_scale": 1.0, "n": 20, "accuracy": 0.5,
                                 "fd": 30.0, "floor": 5.0, "unused": 1}))
    shipped = str(tmp_path / "ship.pt")
    run(ship_checkpoint.main, [os.path.join(run_dir, "ckpt.pt"), "--out", shipped, "--scores", str(score),
                               "--command", "python train.py --steps 3", "--commit", "abc1234", "--machine", "m"])
    full, small = support.load_checkpoint(os.path.join(run_dir, "ckpt.pt")), support.load_checkpoint(shipped)
    assert all(torch.equal(full["ema"][k], small["model"][k]) for k in full["ema"])
    assert small["training"]["images_seen"] == 3 * 16 and small["training"]["commit"] == "abc1234"
    assert small["scores"] == [{"sampler": "ddim", "steps": 50, "cfg_scale": 1.0, "n": 20, "accuracy": 0.5,
                                "fd": 30.0, "floor": 5.0}]
    model, _, names, _ = sample.model_from_checkpoint(shipped)
    assert names == [str(d) for d in range(10)] and not model.training


def test_plot_curve_collects_what_each_snapshot_reached_and_draws_it(tmp_path):
    run_dir = str(tmp_path / "run")
    train.main([*TINY, "--steps", "4", "--snapshot-minutes", "0.00001", "--out", run_dir])
    scores = []
    for name, sampler, steps, cfg, acc in (("ckpt_1e-05min.pt", "dpm++2m", 5, 1.2, 0.5),
                                           ("ckpt.pt", "dpm++2m", 5, 1.2, 0.7), ("ckpt.pt", "ddim", 50, 1.0, 0.6)):
        scores.append(tmp_path / f"{sampler}_{name}.json")
        scores[-1].write_text(json.dumps({"ckpt": os.path.join(run_dir, name), "sampler": sampler, "steps": steps,
                                          "cfg_scale": cfg, "n": 20, "accuracy": acc, "fd": 30.0, "floor": 5.0,
                                          "per_class_accuracy": [acc - 0.1, acc]}))
    curve, png = str(tmp_path / "curve.json"), str(tmp_path / "curve.png")
    run(plot_curve.main, ["collect", *map(str, scores), "--out", curve])
    rows = json.load(open(curve))
    assert [(r["step"], r["images_seen"], r["sampler"]) for r in rows] == [(4, 64, "ddim"), (1, 16, "dpm++2m"),
                                                                          (4, 64, "dpm++2m")]
    out, _ = run(plot_curve.main, ["plot", curve, "--out", png])
    assert "| DPM-Solver++(2M) 5, CFG 1.2 | 20 | 70.00 % | 60.0 % | 30.00 | 5.00 | 6.00 |" in out
    assert Image.open(png).size[0] > 500
    # An earlier curve's points come first; a run that ended on a learning-rate cooldown is a series of its own.
    cooled = str(tmp_path / "cooled")
    train.main([*TINY, "--steps", "6", "--decay-steps", "2", "--out", cooled])
    scores.append(tmp_path / "cooled.json")
    scores[-1].write_text(json.dumps({"ckpt": os.path.join(cooled, "ckpt.pt"), "sampler": "dpm++2m", "steps": 5,
                                      "cfg_scale": 1.2, "n": 20, "accuracy": 0.8, "fd": 20.0, "floor": 5.0}))
    scores.append(tmp_path / "cooled_lof.json")
    scores[-1].write_text(json.dumps({"ckpt": os.path.join(cooled, "ckpt.pt"), "sampler": "dpm++2m", "steps": 10,
                                      "cfg_scale": 1.3, "lower_order_final": True, "n": 20, "accuracy": 0.9,
                                      "fd": 15.0, "floor": 5.0}))
    longer = str(tmp_path / "longer.json")
    run(plot_curve.main, ["collect", *map(str, scores[-2:]), "--extend", curve, "--out", longer])
    rows = json.load(open(longer))
    assert len(rows) == 5 and all(r["cooldown"] and r["step"] == 6 for r in rows[-2:])
    out, _ = run(plot_curve.main, ["plot", longer, "--out", png])
    assert "| DPM-Solver++(2M) 5, CFG 1.2, after a cooldown | 20 | 80.00 % |" in out
    assert "| DPM-Solver++(2M) 10, CFG 1.3, lower-order final, after a cooldown | 20 | 90.00 % |" in out
