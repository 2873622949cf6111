#!/usr/bin/env bash
# The GPU check of issue 17, in one call (under 8 minutes on one H100):
#   1. `driveline bench agree`: the same seed and batch trained 3 steps on the CPU and on the GPU,
#      in f32 (256 px), and with bf16 products (`--precision bf16`, 128 px, its own tolerances);
#   2. DeepLabV3-R50 at 512 px and R101 at 640 px training steps (batch 2), ours and PyTorch's
#      (../shared/bench/torch_ref.py --bench-steps, f32) in the same call: time and peak GPU
#      memory; and ours at R50 512 px with `--precision bf16`;
#   3. R101 at 768 px, batch 2: our peak GPU memory, plain, with `--recompute`, and with both
#      `--recompute` and bf16.
# It writes $OUT/gpu-check.json (every result, the machine) and $OUT/gpu-check.md (one table).
#
#   scripts/gpu-check.sh [--device cuda|cuda:N|cpu] [--bin PATH] [--data DRIVE] [--torch-ref PY]
#                        [--out DIR] [--quick]
#
# --device cpu (implies --quick: small images, one timed step) runs every step of the script on
# the CPU, the model steps on the generic path where `bench agree` puts them (bf16 emulated),
# so that nothing in it fails for reasons other than the GPU. On the GPU machine the CUDA libraries come from
# the PyTorch install (its nvidia/cu13/lib and nvidia/cudnn/lib); the binary is
# target/cuda/driveline-cudnn or target/cuda/driveline (`just build-cuda [--cudnn]`).
# Exit status: 0 when every step ran and both `bench agree` runs passed, 1 otherwise (outputs
# written).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda BIN="" DATA=../shared/data/DRIVE TORCH_REF=../shared/bench/torch_ref.py
DEST=${OUT:-gpu-check-out} QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --data) DATA=$2; shift 2 ;;
        --torch-ref) TORCH_REF=$2; shift 2 ;;
        --out) DEST=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$DEVICE" = cpu ] && QUICK=1
if [ -z "$BIN" ]; then
    for b in target/cuda/driveline-cudnn target/cuda/driveline "${CARGO_TARGET_DIR:-target}/release/driveline"; do
        [ -x "$b" ] && { BIN=$b; break; }
    done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "gpu-check: no driveline binary (--bin)" >&2; exit 2; }
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
mkdir -p "$DEST"
LOG="$DEST/gpu-check.log"
RES=$(mktemp); trap 'rm -f "$RES"' EXIT
T0=$(date +%s)

# CUDA libraries from the machine's PyTorch install (cuBLAS, cuRAND, cudart, cuDNN 9).
PY=${DRIVELINE_TORCH_PYTHON:-python3}
if [ "$DEVICE" != cpu ]; then
    NV=$("$PY" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
    for d in "$NV/cu13/lib" "$NV/cudnn/lib" "$NV/cublas/lib" "$NV/cuda_runtime/lib" "$NV/curand/lib"; do
        [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export LD_LIBRARY_PATH
fi
TORCH=0
"$PY" -c 'import torch, torchvision' 2>/dev/null && [ -f "$TORCH_REF" ] && [ -d "$DATA/training" ] && TORCH=1
TDEV=$DEVICE

# One result line: `<key> <side> <json>`; a failed step records its error and goes on.
FAILED=0
record() {
    local key=$1 side=$2; shift 2
    local out rc
    echo "## $key $side: $*" >>"$LOG"
    out=$(timeout "${STEP_TIMEOUT:-300}" "$@" 2>>"$LOG"); rc=$?
    local last
    last=$(printf '%s\n' "$out" | grep '^{' | tail -n 1)
    if [ $rc -ne 0 ] || [ -z "$last" ]; then
        FAILED=1
        [ -n "$last" ] || last="{}"
        last=$("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); d["error"]="exit status "+sys.argv[2]+" (see gpu-check.log)"; print(json.dumps(d))' "$last" "$rc")
    fi
    echo "$key $side $last" >>"$RES"
    echo "$key $side $last"
}

if [ "$QUICK" = 1 ]; then
    AGREE=64 AGREE_BF16=64 S50=64 S101=64 S768=96 STEPS=1 WARM=0
else
    AGREE=256 AGREE_BF16=128 S50=512 S101=640 S768=768 STEPS=5 WARM=2
fi

# 1. Agreement with the CPU.
record agree ours "$BIN" bench agree --device "$DEVICE" --imgsz "$AGREE" --batch 2 --steps 3 --json
record agree_bf16 ours "$BIN" bench agree --device "$DEVICE" --imgsz "$AGREE_BF16" --batch 2 --steps 3 \
    --precision bf16 --json
# 2. Training steps, ours and PyTorch's.
for spec in "r50 resnet50 $S50" "r101 resnet101 $S101"; do
    set -- $spec
    record "${1}_$3" ours "$BIN" bench train-step --device "$DEVICE" --backbone "$2" --imgsz "$3" \
        --batch 2 --steps "$STEPS" --warmup "$WARM" --json
    [ "$TORCH" = 1 ] && record "${1}_$3" torch "$PY" "$TORCH_REF" --data "$DATA" --backbone "$2" \
        --imgsz "$3" --batch 2 --bench-steps "$STEPS" --device "$TDEV"
done
record "r50_${S50}_bf16" ours "$BIN" bench train-step --device "$DEVICE" --backbone resnet50 \
    --imgsz "$S50" --batch 2 --steps "$STEPS" --warmup "$WARM" --precision bf16 --json
# 3. Peak memory of R101 at 768 px, batch 2: plain, and with recomputation per stage.
record "r101_${S768}" ours "$BIN" bench train-step --device "$DEVICE" --backbone resnet101 \
    --imgsz "$S768" --batch 2 --steps 1 --warmup 0 --json
record "r101_${S768}_recompute" ours "$BIN" bench train-step --device "$DEVICE" --backbone resnet101 \
    --imgsz "$S768" --batch 2 --steps 1 --warmup 0 --recompute --json
record "r101_${S768}_recompute_bf16" ours "$BIN" bench train-step --device "$DEVICE" \
    --backbone resnet101 --imgsz "$S768" --batch 2 --steps 1 --warmup 0 --recompute \
    --precision bf16 --json

GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
"$PY" - "$RES" "$DEST" "$DEVICE" "${GPU:-none}" "$CPU" "$(( $(date +%s) - T0 ))" "$TORCH" <<'EOF'
import json, sys
res, dest, device, gpu, cpu, seconds, torch = sys.argv[1:8]
rows = {}
for line in open(res):
    key, side, js = line.rstrip("\n").split(" ", 2)
    rows.setdefault(key, {})[side] = json.loads(js)
doc = {"device": device, "gpu": gpu, "cpu": cpu, "seconds": int(seconds),
       "torch": torch == "1", "results": rows}
json.dump(doc, open(f"{dest}/gpu-check.json", "w"), indent=1)

def mem(d, side):
    if side == "torch":
        return d.get("peak_mem_gib", 0) * 1024 if "peak_mem_gib" in d else None
    return d.get("gpu_peak_mib", d.get("peak_rss_mib"))

fmt = lambda v, f: "n/a" if v is None else f.format(v)
md = [f"GPU check ({device}): {gpu}; host {cpu}; {seconds} s", "",
      "| check | ours | PyTorch | ours/PyTorch |", "|---|---|---|---|"]
for key in ("agree", "agree_bf16"):
    a = rows.get(key, {}).get("ours", {})
    if not a:
        continue
    if "error" in a and "what" not in a:
        md.append(f"| bench agree ({key}) | {a['error']} | | |")
        continue
    md.append("| bench agree ({}, {}) | loss max rel diff {} (issue: ≤ {}: {}); vs float64 {} (CPU f32 {}): {}; pixels {} (≥ {}) | | |".format(
        a.get("what", "?"), a.get("precision", "f32"), fmt(a.get("max_loss_rel_diff"), "{:.2e}"),
        a.get("loss_tolerance"), "pass" if a.get("pass") else "FAIL",
        fmt(a.get("device_f32_error"), "{:.2e}"), fmt(a.get("cpu_f32_error"), "{:.2e}"),
        "pass" if a.get("pass_vs_f64") else "FAIL",
        fmt(a.get("pixel_agreement") and 100 * a["pixel_agreement"], "{:.4f} %"),
        fmt(a.get("min_pixel_agreement") and 100 * a["min_pixel_agreement"], "{:.1f} %")))
for key, sides in rows.items():
    if key.startswith("agree"):
        continue
    o, t = sides.get("ours", {}), sides.get("torch", {})
    what = o.get("what", key) + (" recompute" if o.get("recompute") else "") \
        + (f" {o['precision']}" if o.get("precision") else "")
    unit = "GPU" if o.get("gpu_peak_mib") is not None else "RSS"
    if "error" in o:
        md.append(f"| {what} | {o['error']} | | |")
        continue
    ot, tt, om, tm = o.get("median_s"), t.get("median_s"), mem(o, "ours"), mem(t, "torch")
    md.append("| {} step | {} s, {} peak {} MiB | {} | {} time, {} memory |".format(
        what, fmt(ot, "{:.3f}"), unit, fmt(om, "{:.0f}"),
        "n/a" if not t else f"{t.get('median_s', 0):.3f} s, peak {fmt(tm, '{:.0f}')} MiB",
        fmt(ot / tt if ot and tt else None, "{:.2f}×"), fmt(om / tm if om and tm else None, "{:.2f}×")))
open(f"{dest}/gpu-check.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
AGREE_OK=$(grep -E '^agree(_bf16)? ours' "$RES" | grep -cE '"pass_vs_f64": ?true')
[ "$FAILED" = 0 ] && [ "$AGREE_OK" = 2 ] || exit 1
