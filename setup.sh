#!/usr/bin/env bash
# One command on a fresh machine: install the tools driveline needs, link the DRIVE data set
# when it sits beside the repository, build, and run the quick experiment.
#   ./setup.sh            set up and run experiments/quick.toml
#   ./setup.sh --no-run   set up only
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v just >/dev/null 2>&1; then
    echo "installing just (from PyPI: rust-just)"
    python3 -m pip install --quiet rust-just
fi
if [ ! -e data/DRIVE ] && [ -d ../shared/data/DRIVE ]; then
    mkdir -p data
    ln -s "$(cd ../shared/data/DRIVE && pwd)" data/DRIVE
    echo "linked data/DRIVE -> ../shared/data/DRIVE"
fi
cargo build --release
if [ "${1:-}" != "--no-run" ]; then
    target/release/driveline run experiments/quick.toml
fi
