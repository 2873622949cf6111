#!/usr/bin/env bash
# Build driveline with CUDA on a machine without a GPU or a system CUDA toolkit, from NVIDIA's
# PyPI wheels (see docs/cuda.md for why each step is needed):
#   - nvcc 13.0 (the GPU machines' driver is CUDA 13.0; newer PTX would be rejected);
#   - compute capability set explicitly (9.0, Hopper), since no GPU is there to detect;
#   - a stub libcuda.so.1 to link against (the real one comes with the driver at run time).
# Result: target/release/driveline with `--features cuda`. At run time it needs
# libcuda.so.1 (driver), libcublas.so.13, libcurand.so.10, libcudart.so.13 on LD_LIBRARY_PATH.
#   scripts/build-cuda.sh [--compute-cap 90]
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=90
[ "${1:-}" = "--compute-cap" ] && CAP="$2"
VENV=${DRIVELINE_CUDA_VENV:-.cuda-venv}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" nvidia-curand
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$CU/bin/nvcc" ] || { echo "nvcc not found under $CU" >&2; exit 1; }

# The linker wants unversioned names.
for lib in cublas cublasLt cudart nvrtc; do
    [ -e "$CU/lib/lib$lib.so" ] || ln -s "lib$lib.so.13" "$CU/lib/lib$lib.so"
done
[ -e "$CU/lib/libcurand.so" ] || ln -s libcurand.so.10 "$CU/lib/libcurand.so"

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
cargo build --release --features cuda
echo "built target/release/driveline with CUDA (compute capability $CAP)"
