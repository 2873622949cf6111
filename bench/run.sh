#!/usr/bin/env bash
# Benchmarks of driveline on this machine, with the PyTorch references side by side when
# PyTorch is importable. Run from the repository root (`just bench`, which builds the release
# binary first). Prints one line per benchmark (median, min, images/s, GFLOP/s, peak RSS) and a
# ratio table ours/PyTorch (below 1 = driveline faster).
#
#   bench/run.sh                        # default, short
#   bench/run.sh --steps-256 5 --steps-512 3 --infer-steps 3 --unet-steps 5 --data-reps 1
#   bench/run.sh --no-torch             # driveline only
#   bench/run.sh --only r50_256,unet    # a subset: r50_256 r50_512 infer data unet
#
# Environment: DRIVELINE_BIN (default $CARGO_TARGET_DIR/release/driveline or
# target/release/driveline), DRIVELINE_DATA (default ../shared/data/DRIVE),
# DRIVELINE_TORCH_PYTHON (default: python3, then /tmp/tv/bin/python), RAYON_NUM_THREADS.
set -euo pipefail

cd "$(dirname "$0")/.."
STEPS_256=5 STEPS_512=3 INFER_STEPS=3 UNET_STEPS=5 DATA_REPS=1 TORCH=1 ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --steps-256) STEPS_256=$2; shift 2 ;;
        --steps-512) STEPS_512=$2; shift 2 ;;
        --infer-steps) INFER_STEPS=$2; shift 2 ;;
        --unet-steps) UNET_STEPS=$2; shift 2 ;;
        --data-reps) DATA_REPS=$2; shift 2 ;;
        --no-torch) TORCH=0; shift ;;
        --only) ONLY=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

BIN=${DRIVELINE_BIN:-${CARGO_TARGET_DIR:-target}/release/driveline}
DATA=${DRIVELINE_DATA:-../shared/data/DRIVE}
[ -x "$BIN" ] || { echo "bench/run.sh: no binary at $BIN (cargo build --release)" >&2; exit 1; }

PY=""
if [ "$TORCH" = 1 ]; then
    for p in "${DRIVELINE_TORCH_PYTHON:-python3}" /tmp/tv/bin/python; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch, torchvision" 2>/dev/null; then
            PY=$p; break
        fi
    done
    [ -n "$PY" ] || echo "# PyTorch not importable: driveline figures only"
fi

want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
OUT=$(mktemp); trap 'rm -f "$OUT"' EXIT
# Each result is appended as `<key> <side> <json>`.
ours() { local key=$1; shift; local j; j=$("$BIN" bench "$@" --json | tail -1); echo "$key ours $j" >>"$OUT"; }
theirs() { local key=$1; shift; local j; j=$("$PY" "$@" | tail -1); echo "$key torch $j" >>"$OUT"; }

IMAGE=""
[ -f "$DATA/test/images/01_test.tif" ] && IMAGE="$DATA/test/images/01_test.tif"

echo "# $(date -u '+%Y-%m-%d %H:%M UTC')  $(nproc) cores  load $(cut -d' ' -f1-3 /proc/loadavg)  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
if want r50_256; then
    ours r50_256 train-step --backbone resnet50 --imgsz 256 --batch 2 --steps "$STEPS_256" --warmup 1
    [ -n "$PY" ] && [ -d "$DATA" ] && theirs r50_256 ../shared/bench/torch_ref.py --data "$DATA" --backbone resnet50 --imgsz 256 --bench-steps "$STEPS_256"
fi
if want r50_512; then
    ours r50_512 train-step --backbone resnet50 --imgsz 512 --batch 2 --steps "$STEPS_512" --warmup 1
    [ -n "$PY" ] && [ -d "$DATA" ] && theirs r50_512 ../shared/bench/torch_ref.py --data "$DATA" --backbone resnet50 --imgsz 512 --bench-steps "$STEPS_512"
fi
if want infer; then
    ours infer infer --backbone resnet50 --imgsz 768 --steps "$INFER_STEPS" ${IMAGE:+--image "$IMAGE"}
    [ -n "$PY" ] && theirs infer bench/torch_infer.py --imgsz 768 --steps "$INFER_STEPS" ${IMAGE:+--image "$IMAGE"}
fi
if want data; then
    if [ -d "$DATA" ]; then
        ours data data experiments/r50_512.toml --set "data.root=$DATA" --reps "$DATA_REPS"
    else
        echo "# no DRIVE data at $DATA: data-loading benchmark skipped"
    fi
fi
if want unet; then
    ours unet train-step --arch unet --imgsz 96 --batch 16 --loss ce+dice --steps "$UNET_STEPS" --warmup 1
    [ -n "$PY" ] && theirs unet bench/torch_unet_step.py --ref ../shared/bench/unet_ref.py --imgsz 96 --batch 16 --steps "$UNET_STEPS"
fi

# Summary (jq): each of ours, then the ratio to PyTorch where it ran.
jq -rs '
  def f(x; n): (x * pow(10; n) | round) / pow(10; n) | tostring;
  (map(select(.side == "torch")) | map({(.key): .r}) | add // {}) as $t
  | map(select(.side == "ours")) | .[]
  | .r as $o | ($t[.key]) as $p
  | "\(.key | . + "         " | .[0:9]) ours \(f($o.median_s; 3)) s (min \(f($o.min_s; 3)))"
    + (if $o.images_per_s then "  \(f($o.images_per_s; 2)) img/s" else "" end)
    + (if $o.gflop_per_s then "  \(f($o.gflop_per_s; 1)) GFLOP/s" else "" end)
    + "  peak RSS \(f($o.peak_rss_mib; 0)) MiB"
    + (if $p then "  | torch \(f($p.median_s; 3)) s, peak \(f($p.peak_mem_gib * 1024; 0)) MiB  | ours/torch time \(f($o.median_s / $p.median_s; 2))x, memory \(f($o.peak_rss_mib / ($p.peak_mem_gib * 1024); 2))x" else "" end)
' < <(while read -r key side json; do printf '{"key":"%s","side":"%s","r":%s}\n' "$key" "$side" "$json"; done <"$OUT")
