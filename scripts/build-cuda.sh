#!/usr/bin/env bash
# Build driveline with CUDA on a machine without a GPU or a system CUDA toolkit, from NVIDIA's
# PyPI wheels (see docs/cuda.md for why each step is needed):
#   - nvcc 13.0 (the GPU machines' driver is CUDA 13.0; newer PTX would be rejected);
#   - compute capability set explicitly (9.0, Hopper), since no GPU is there to detect;
#   - a stub libcuda.so.1 to link against (the real one comes with the driver at run time).
# It builds into its own target folder (default target/cuda, or $DRIVELINE_CUDA_TARGET_DIR), so
# the CPU binary in target/release is left alone, and copies the result to
#   <target>/driveline         (--features cuda)
#   <target>/driveline-cudnn   (--features cuda,cudnn, with --cudnn; cuDNN from its PyPI wheel)
# At run time it needs libcuda.so.1 (driver), libcublas.so.13, libcurand.so.10, libcudart.so.13
# (and libcudnn.so.9 for the cuDNN build) on LD_LIBRARY_PATH.
#   scripts/build-cuda.sh [--cudnn] [--compute-cap 90]
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=90
CUDNN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cudnn) CUDNN=1 ;;
        --compute-cap) CAP="${2:?--compute-cap needs a value, e.g. 90}"; shift ;;
        *) echo "usage: scripts/build-cuda.sh [--cudnn] [--compute-cap 90]" >&2; exit 2 ;;
    esac
    shift
done
VENV=${DRIVELINE_CUDA_VENV:-.cuda-venv}
TARGET=${DRIVELINE_CUDA_TARGET_DIR:-target/cuda}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
WHEELS=("nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*"
    "nvidia-cublas==13.0.*" nvidia-curand)
[ "$CUDNN" = 1 ] && WHEELS+=("nvidia-cudnn-cu13==9.*")
"$VENV/bin/pip" install --quiet "${WHEELS[@]}"
NV=$("$VENV/bin/python" -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
CU="$NV/cu13"
[ -x "$CU/bin/nvcc" ] || { echo "nvcc not found under $CU" >&2; exit 1; }

# The linker wants unversioned names.
for lib in cublas cublasLt cudart nvrtc; do
    [ -e "$CU/lib/lib$lib.so" ] || ln -s "lib$lib.so.13" "$CU/lib/lib$lib.so"
done
[ -e "$CU/lib/libcurand.so" ] || ln -s libcurand.so.10 "$CU/lib/libcurand.so"
if [ "$CUDNN" = 1 ]; then
    # nvidia-cudnn-cu13 installs nvidia/cudnn/lib/libcudnn.so.9. The linker finds it through a
    # link in cu13/lib, already on the search path: RUSTFLAGS stay those of the plain CUDA build,
    # so both builds share the target folder (a RUSTFLAGS change rebuilds every crate, Candle's
    # CUDA kernels included).
    CUDNN_LIB=$(ls "$NV"/cudnn/lib/libcudnn.so.9 "$CU"/lib/libcudnn.so.9 2>/dev/null | head -n 1 || true)
    [ -n "$CUDNN_LIB" ] || { echo "libcudnn.so.9 not found under $NV" >&2; exit 1; }
    [ -e "$CU/lib/libcudnn.so" ] || ln -s "$CUDNN_LIB" "$CU/lib/libcudnn.so"
fi

# A stub driver library exporting every cu* symbol cudarc declares.
STUBS="$CU/lib/stubs"
mkdir -p "$STUBS"
if [ ! -e "$STUBS/libcuda.so" ]; then
    cargo fetch --quiet
    SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys 2>/dev/null | sort | tail -n 1)
    [ -n "$SYS" ] || { echo "cudarc source not found in the cargo registry" >&2; exit 1; }
    grep -rhoE 'fn cu[A-Za-z0-9_]+\(' "$SYS" | sed -E 's/fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
        awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$STUBS/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so.1" "$STUBS/cuda_stub.c"
    ln -sf libcuda.so.1 "$STUBS/libcuda.so"
fi

export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU" CUDA_COMPUTE_CAP="$CAP"
export RUSTFLAGS="${RUSTFLAGS:-} -L $STUBS -L $CU/lib"
export CARGO_TARGET_DIR="$TARGET"
FEATURES=cuda
NAME=driveline
if [ "$CUDNN" = 1 ]; then
    FEATURES=cuda,cudnn
    NAME=driveline-cudnn
fi
cargo build --release --features "$FEATURES"
cp "$TARGET/release/driveline" "$TARGET/$NAME"
echo "built $TARGET/$NAME with --features $FEATURES (compute capability $CAP)"
