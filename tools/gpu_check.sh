#!/usr/bin/env bash
# The GPU path checked in one command (about 10 minutes on one GPU), ending with a summary table:
#   1. the machine: torch, CUDA, the GPU, bf16, TensorRT, ONNX Runtime's providers
#   2. pytest tests/test_gpu.py (AMP, GradScaler, compile, resume, CUDA graphs, sampling, export on CUDA)
#   3. a short DiT-S/4 training in each AMP mode the GPU has, with images/s
#   4. tools/bench.py on the GPU (sampling and training rows against eager fp32)
#   5. export.py, then infer_trt.py --compare on ONNX Runtime and, where TensorRT is installed, on the engine
# Needs PyTorch >= 2.13 with CUDA; no internet. On a machine without a GPU it runs what it can and says
# what it skips.
#
#   bash tools/gpu_check.sh [--data-dir MNIST_DIR] [--out DIR] [--python PYTHON]
#
# MNIST: --data-dir (a folder with the four official IDX .gz files), else the repository's mnist/.
set -u
cd "$(dirname "$0")/.."
PY=python; OUT=gpu_check; DATA=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) DATA=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument $1; see --help" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
STATUS="$OUT/status.tsv"; : > "$STATUS"
if [ -z "$DATA" ]; then
    DATA=mnist
fi
if [ ! -f "$DATA/t10k-images-idx3-ubyte.gz" ] && [ ! -f "$DATA/t10k-images-idx3-ubyte" ]; then
    echo "gpu_check.sh: error: no MNIST files in $DATA; pass --data-dir with the four IDX .gz files" >&2
    exit 2
fi
export MNIST_DIR="$DATA"

# step NAME TIMEOUT_S COMMAND...: run it, log its output to $OUT/NAME.log, record status and seconds.
step() {
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    echo "== $name: $*"
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
step environment 120 "$PY" - <<'EOF'
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
        try:
            import tensorrt
            extra = f" {tensorrt.__version__}"
        except Exception as e:
            extra = f" (does not import: {str(e)[:100]})"
    print(name, "installed" + extra if found else "not installed")
EOF
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
BF16=$("$PY" -c "import torch, cli; print(int(torch.cuda.is_available() and cli.has_fast_bf16('cuda')))" 2>/dev/null || echo 0)
TRT=$("$PY" -c "import importlib.util as u, torch; print(int(u.find_spec('tensorrt') is not None and torch.cuda.is_available()))" 2>/dev/null || echo 0)

# 2. The GPU tests
step pytest-gpu 420 "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider

# 3. Training in each AMP mode
if [ "$GPU" = 1 ]; then
    for amp in off bf16 fp16; do
        if [ "$amp" = bf16 ] && [ "$BF16" != 1 ]; then skip train-$amp "no bf16 on this GPU"; continue; fi
        rm -rf "$OUT/train-$amp"
        step train-$amp 180 "$PY" train.py --model DiT-S/4 --amp "$amp" --steps 300 --log-every 50 \
            --sample-every 0 --data-dir "$DATA" --out "$OUT/train-$amp"
    done
else
    for amp in off bf16 fp16; do skip train-$amp "no CUDA GPU"; done
fi

# 4. The speed table
if [ "$GPU" = 1 ]; then
    step bench 420 "$PY" tools/bench.py --preset DiT-S/4 --batch-sizes 8,64,256 --repeats 3 --sample-repeats 2 \
        --json "$OUT/bench.json"
else
    skip bench "no CUDA GPU (tools/bench.py runs on a CPU by itself)"
fi

# 5. Export and the engine-driven sampler
if [ "$GPU" = 1 ] && [ -f "$OUT/train-off/ckpt.pt" ]; then
    step export 300 "$PY" export.py --ckpt "$OUT/train-off/ckpt.pt" --out-dir "$OUT/deploy"
    step infer-ort 180 "$PY" infer_trt.py --onnx "$OUT/deploy/model.onnx" --backend ort --device cuda --compare \
        --out "$OUT/infer_ort.png"
    if [ "$TRT" = 1 ]; then
        step infer-trt 180 "$PY" infer_trt.py --engine "$OUT/deploy/model_fp16.engine" --backend trt --cuda-graph \
            --compare --out "$OUT/infer_trt.png"
    else
        skip infer-trt "TensorRT is not installed"
    fi
else
    skip export "no CUDA GPU or no trained checkpoint"; skip infer-ort "no export"; skip infer-trt "no export"
fi

# The summary
"$PY" - "$OUT" <<'EOF'
import csv, json, os, re, sys
out = sys.argv[1]
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
    if name.startswith("train-"):
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
text = "\n".join(table)
print("\n" + text)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
EOF
! grep -q -P "\t(FAILED|TIMED)" "$STATUS"
