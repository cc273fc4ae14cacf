#!/usr/bin/env bash
# The GPU path checked in one command of at most 9 minutes (BUDGET), ending with a summary table. The most
# telling steps come first, so a short lease still checks the deployment:
#   0. preflight: the PyTorch the README requires and every module the project imports, or one line and stop
#   1. the machine: torch, CUDA, the GPU, bf16, TensorRT, ONNX Runtime's providers
#   2. export.py on the shipped model, on the GPU, then infer_trt.py --compare on ONNX Runtime and, where
#      TensorRT is installed, on the engine
#   3. a short DiT-S/4 training with --amp auto (bf16 on compute capability 8+, fp16 + GradScaler before)
#   4. pytest tests/test_gpu.py (AMP, GradScaler, compile, resume, CUDA graphs, sampling, export on CUDA)
#   5. tools/bench.py: a short speed table of the shipped model (last: the slowest and least telling)
# Each step has a time-out, and they add up to BUDGET; a step that would end past BUDGET is cut to what is
# left. Needs PyTorch >= 2.13 with CUDA; no internet. Without a GPU it runs what it can and says what it skips.
#
#   bash tools/gpu_check.sh [--data-dir MNIST_DIR] [--out DIR] [--python PYTHON] [--any-torch]
#
# MNIST: --data-dir (a folder with the four official IDX .gz files), else the repository's mnist/.
# --any-torch: check an older PyTorch anyway (the summary names its version).
set -u
cd "$(dirname "$0")/.."
PY=python; OUT=gpu_check; DATA=""; ANY_TORCH=0
BUDGET=540
START=$(date +%s)
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) DATA=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --any-torch) ANY_TORCH=1; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument $1; see --help" >&2; exit 2 ;;
    esac
done

# 0. Preflight: nothing below can run without these, so a missing one is one line, not a table of failures.
"$PY" - "$ANY_TORCH" <<'EOF' || exit 2
import ast, glob, importlib, sys
# Every module the project's files import, at the top or inside a function, found by reading them; the
# optional ones (TensorRT, matplotlib for plots) are checked by their own steps. torch.onnx.export(dynamo=True)
# needs onnxscript, and the GPU tests pytest.
files = glob.glob("*.py") + glob.glob("tools/*.py") + ["tests/test_gpu.py", "tests/conftest.py"]
ours = {f.rsplit("/", 1)[-1][:-3] for f in glob.glob("*.py") + glob.glob("tools/*.py") + glob.glob("tests/*.py")}
names = {"onnxscript", "pytest"}
for f in files:
    for node in ast.walk(ast.parse(open(f).read())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
names -= set(sys.stdlib_module_names) | ours | {"tensorrt", "matplotlib"}
missing = []
for name in sorted(names):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__})")
if missing:
    sys.exit(f"gpu_check.sh: error: cannot import {', '.join(missing)}; pip install -r requirements.txt")
import torch
version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if version < (2, 13) and sys.argv[1] != "1":
    sys.exit(f"gpu_check.sh: error: torch {torch.__version__} is older than 2.13, which the README requires; "
             f"pip install 'torch>=2.13', or pass --any-torch to check this one anyway")
EOF

if [ -z "$DATA" ]; then
    DATA=mnist
fi
if [ ! -f "$DATA/t10k-images-idx3-ubyte.gz" ] && [ ! -f "$DATA/t10k-images-idx3-ubyte" ]; then
    echo "gpu_check.sh: error: no MNIST files in $DATA; pass --data-dir with the four IDX .gz files" >&2
    exit 2
fi
export MNIST_DIR="$DATA"
mkdir -p "$OUT"
STATUS="$OUT/status.tsv"; : > "$STATUS"

# step NAME TIMEOUT_S COMMAND...: run it, log its output to $OUT/NAME.log, record status and seconds. The
# time-out is cut to what is left of BUDGET; with under 15 s left the step is skipped.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 15 ]; then skip "$name" "out of the ${BUDGET} s budget"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
    local start=$(date +%s)
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? secs=$(( $(date +%s) - start ))
    local status=ok
    [ $rc -eq 124 ] && status="TIMED OUT after ${limit} s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
    printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >> "$STATUS"
}
skip() { printf '%s\tskipped: %s\t0\n' "$1" "$2" >> "$STATUS"; echo "== $1: skipped ($2)"; }

# 1. The machine
step environment 30 "$PY" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"bf16 {'yes' if p.major >= 8 else 'no (fp16 + GradScaler)'}")
else:
    print("no CUDA GPU")
for name in ("tensorrt", "onnxruntime"):
    found = importlib.util.find_spec(name) is not None
    extra = ""
    if found and name == "onnxruntime":
        import onnxruntime
        extra = f" {onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}"
    if found and name == "tensorrt":
        import infer_trt
        extra = f": {infer_trt.trt_unavailable_reason() or 'usable'}"
    print(name, "installed" + extra if found else "not installed")
EOF
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
TRT=$("$PY" -c "import infer_trt; print(int(infer_trt.trt_unavailable_reason() is None))" 2>/dev/null || echo 0)

# 2. The deployment: the shipped model exported on the GPU, and sampled on what the export wrote
if [ "$GPU" = 1 ]; then
    step export 90 "$PY" export.py --out-dir "$OUT/deploy"
    step infer-ort 40 "$PY" infer_trt.py --onnx "$OUT/deploy/model.onnx" --backend ort --device cuda --compare \
        --out "$OUT/infer_ort.png"
    if [ "$TRT" = 1 ]; then
        step infer-trt 50 "$PY" infer_trt.py --engine "$OUT/deploy/model_fp16.engine" --backend trt \
            --cuda-graph --compare --out "$OUT/infer_trt.png"
    else
        skip infer-trt "TensorRT is not usable here (see environment)"
    fi
else
    skip export "no CUDA GPU"; skip infer-ort "no CUDA GPU"; skip infer-trt "no CUDA GPU"
fi

# 3. Training: the GPU default model with the GPU's AMP mode, its images/s
if [ "$GPU" = 1 ]; then
    rm -rf "$OUT/train"
    step train 70 "$PY" train.py --model DiT-S/4 --amp auto --steps 200 --log-every 50 --sample-every 0 \
        --data-dir "$DATA" --out "$OUT/train"
else
    skip train "no CUDA GPU"
fi

# 4. The GPU tests
step pytest-gpu 150 "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider

# 5. The speed table, short: the shipped model at two batch sizes
if [ "$GPU" = 1 ]; then
    step bench 80 "$PY" tools/bench.py --batch-sizes 8,64 --repeats 3 --sample-repeats 1 --ddpm off \
        --json "$OUT/bench.json"
else
    skip bench "no CUDA GPU (tools/bench.py runs on a CPU by itself)"
fi

# The summary
"$PY" - "$OUT" "$(( $(date +%s) - START ))" "$BUDGET" <<'EOF'
import csv, json, os, re, sys
out, total, budget = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "status.tsv"))]

def log(name):
    path = os.path.join(out, f"{name}.log")
    return open(path).read() if os.path.exists(path) else ""

def detail(name):
    text = log(name)
    if name == "environment":
        return "; ".join(l for l in text.splitlines() if l.startswith(("python", "GPU", "no CUDA"))).replace("|", ",")[:160]
    if name == "pytest-gpu":
        found = re.findall(r"\d+ (?:passed|failed|skipped|error)\w*", text)
        return ", ".join(found)
    if name == "train":
        path = os.path.join(out, name, "log.csv")
        if os.path.exists(path):
            r = list(csv.DictReader(open(path)))
            return f"{r[-1]['images_per_s']} img/s at step {r[-1]['step']}, loss {r[0]['loss']} -> {r[-1]['loss']}" if r else ""
    if name == "bench" and os.path.exists(os.path.join(out, "bench.json")):
        b = json.load(open(os.path.join(out, "bench.json")))
        best = max(b["sampling"], key=lambda r: b["sampling"][0]["seconds"]["median"] / r["seconds"]["median"])
        return (f"64 digits: eager {b['sampling'][0]['seconds']['median']:.2f} s, best {best['backend']} "
                f"{best['seconds']['median']:.3f} s")
    if name.startswith(("infer-", "export")):
        lines = [l for l in text.splitlines() if "largest pixel difference" in l or "TensorRT" in l]
        return lines[-1].strip()[:160] if lines else ""
    return ""

table = ["| step | result | seconds | detail |", "|---|---|---|---|"]
table += [f"| {name} | {status} | {secs} | {detail(name) if not status.startswith('skipped') else ''} |"
          for name, status, secs in rows]
table.append(f"| all | | {total} | budget {budget} s |")
text = "\n".join(table)
print("\n" + text)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
EOF
! grep -q -P "\t(FAILED|TIMED)" "$STATUS"
