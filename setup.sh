#!/usr/bin/env bash
# One command on a fresh machine: install what driveline and its tests need, link the DRIVE
# data set when it sits beside the repository, build, and run the quick experiment.
#   ./setup.sh              set up, build, run experiments/quick.toml
#   ./setup.sh --no-run     set up and build only
#   ./setup.sh --deps-only  install the tools only (what CI does before `just test`)
# Installs: `just` (PyPI), Chromium (the report's browser tests; Debian package) and a
# single-node Slurm cluster (the Slurm executor's tests; scripts/slurm-dev.sh). The last two
# need root or sudo; without them the script says which tests will fail and how to skip them.
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-}"

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        return 1
    fi
}

if ! command -v just >/dev/null 2>&1; then
    echo "installing just (from PyPI: rust-just)"
    python3 -m pip install --quiet rust-just
    if ! command -v just >/dev/null 2>&1; then
        # pip's script folder is not on PATH: link `just` next to cargo, which is.
        scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
        cargo_bin=$(dirname "$(command -v cargo)")
        ln -sf "$scripts/just" "$cargo_bin/just"
        echo "linked $cargo_bin/just -> $scripts/just"
    fi
fi

if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium (Debian package; the report's browser tests use it)"
    if ! { as_root apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        echo "warning: could not install chromium (needs root or sudo): the browser tests will fail;" \
            "install it yourself or set DRIVELINE_SKIP_BROWSER=1" >&2
    fi
fi

if ! as_root scripts/slurm-dev.sh start; then
    echo "warning: could not start the single-node Slurm cluster (needs root or sudo): the Slurm" \
        "tests will fail; run 'sudo scripts/slurm-dev.sh start' or set DRIVELINE_SKIP_SLURM=1" >&2
fi

if [ ! -e data/DRIVE ] && [ -d ../shared/data/DRIVE ]; then
    mkdir -p data
    ln -s "$(cd ../shared/data/DRIVE && pwd)" data/DRIVE
    echo "linked data/DRIVE -> ../shared/data/DRIVE"
fi

[ "$mode" = "--deps-only" ] && exit 0
cargo build --release
if [ "$mode" != "--no-run" ]; then
    target/release/driveline run experiments/quick.toml
fi
