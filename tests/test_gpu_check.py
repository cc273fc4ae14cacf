"""tools/gpu_check.sh, the one command a lent GPU runs: its preflight stops in one line before any step when a
module the project imports is missing, its steps' time-outs fit the nine minutes a device call allows, and on
a machine without a GPU it runs what it can and says what it skips."""
import os
import re
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
DEVICE_CALL_S = 540          # a lent GPU gives at most 10 minutes a command: the check keeps one in hand


def test_the_steps_time_outs_fit_the_budget():
    text = open(SCRIPT).read()
    budget = int(re.search(r"^BUDGET=(\d+)$", text, re.M).group(1))
    limits = dict(re.findall(r"^\s*step ([\w-]+) (\d+) ", text, re.M))
    assert set(limits) == {"environment", "export", "infer-ort", "infer-trt", "train", "pytest-gpu", "bench"}
    assert budget <= DEVICE_CALL_S and sum(map(int, limits.values())) <= budget, limits


def test_the_preflight_names_a_missing_module_in_one_line_and_runs_no_step(tmp_path):
    hidden = tmp_path / "hide" / "einops"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide")}
    r = subprocess.run(["bash", SCRIPT, "--python", sys.executable, "--out", str(tmp_path / "out")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == ("gpu_check.sh: error: cannot import einops (ImportError); "
                                "pip install -r requirements.txt")
    assert r.stdout == "" and not (tmp_path / "out").exists()


def test_without_a_gpu_it_runs_what_it_can_and_says_what_it_skips(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, "--python", sys.executable, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.md").read_text()
    assert "| environment | ok |" in summary and "no CUDA GPU" in summary
    assert re.search(r"\| pytest-gpu \| ok \| \d+ \| \d+ passed, \d+ skipped", summary), summary
    for name in ("export", "infer-ort", "infer-trt", "train", "bench"):
        assert f"| {name} | skipped: no CUDA GPU" in summary, summary
    assert "| all | |" in summary and "budget 540 s" in summary
