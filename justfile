# driveline — common commands. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

bin := "target/release/driveline"

# Build the release binary.
build:
    cargo build --release

# Run the stale stages of experiments: `just run experiments/r101_640.toml [--set train.lr=3e-4]`.
run *ARGS: build
    {{bin}} run {{ARGS}}

# The quick experiment (synthetic data, small model, a few minutes on 2 cores).
quick: build
    {{bin}} run experiments/quick.toml

# Fresh/stale per stage, with the reason; runs nothing.
status *ARGS: build
    {{bin}} status {{ARGS}}

# Print an experiment's stage graph (`--dot` for Graphviz).
dag *ARGS: build
    {{bin}} dag {{ARGS}}

# The comparison report of the seed article's four experiments and the U-Net recipe.
report *ARGS: build
    {{bin}} report experiments/r50_512.toml experiments/r50_768.toml experiments/r101_512.toml experiments/r101_640.toml experiments/unet_native.toml --name article {{ARGS}}

# Formatting, lints and every test (what CI runs).
test:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    cargo test --all-targets

# Build with CUDA (no GPU or system toolkit needed: NVIDIA's PyPI wheels and a stub driver)
# into target/cuda/driveline (`--cudnn`: target/cuda/driveline-cudnn). See docs/cuda.md.
build-cuda *ARGS:
    scripts/build-cuda.sh {{ARGS}}

# The one-call GPU check (agreement, step times and memory beside PyTorch): docs/cuda.md.
gpu-check *ARGS:
    scripts/gpu-check.sh {{ARGS}}

# Benchmarks: training step, inference, data loading; PyTorch side by side when installed.
bench *ARGS: build
    bench/run.sh {{ARGS}}

# The Slurm executor's own overhead on the local cluster (scripts/slurm-dev.sh start first).
bench-slurm *ARGS: build
    bench/slurm_overhead.py {{ARGS}}

# A single-node Slurm cluster on this machine (root): start, stop or status.
slurm *ARGS:
    scripts/slurm-dev.sh {{ARGS}}
