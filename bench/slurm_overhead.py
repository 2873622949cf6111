#!/usr/bin/env python3
"""The Slurm executor's own overhead: N trivial stages through the local cluster.

25 experiments on the `dbg` test pipeline share split and preprocess and each add two
trivial stages (the `debug` stage: a few small files), so the driver submits 50 jobs plus the
2 shared ones. Prints, from the driver's --json output and the job files in the cache:
submit-to-start latency (job.json's submitted_at to exec-stage's started_at), the wall time
per stage, and the driver's polls and squeue calls per minute.

Needs the cluster up (scripts/slurm-dev.sh start) and a built binary:
    bench/slurm_overhead.py [--bin target/release/driveline] [--experiments 25] [--poll 1.0]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXP = """name = "{name}"
pipeline = "dbg"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 6
test_count = 2
width = 64
height = 64
[train]
imgsz = 64
lr = {lr}
[resources.default]
cpus = 1
mem = "100M"
time = "00:05:00"
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/driveline"))
    ap.add_argument("--experiments", type=int, default=25)
    ap.add_argument("--poll", type=float, default=1.0)
    a = ap.parse_args()
    proj = tempfile.mkdtemp(prefix="dl-slurm-bench-")
    os.makedirs(os.path.join(proj, "pipelines"))
    os.makedirs(os.path.join(proj, "experiments"))
    for d in ["pipelines", "tests/pipelines"]:
        for f in os.listdir(os.path.join(ROOT, d)):
            if f.endswith(".toml"):
                shutil.copy(os.path.join(ROOT, d, f), os.path.join(proj, "pipelines"))
    files = []
    for i in range(a.experiments):
        p = os.path.join(proj, "experiments", f"e{i}.toml")
        with open(p, "w") as f:
            f.write(EXP.format(name=f"e{i}", lr=f"{(i + 1) * 1e-4:.6f}"))
        files.append(p)
    t0 = time.time()
    out = subprocess.run(
        [a.bin, "run", "--json", "--executor", "slurm", "--poll-interval", str(a.poll)] + files,
        cwd=proj, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        sys.exit(out.stderr)
    v = json.loads(out.stdout)
    jobs = os.path.join(proj, ".driveline/cache/jobs")
    lat, react, info = [], [], {}
    for key in os.listdir(jobs):
        d = os.path.join(jobs, key)
        rec = json.load(open(os.path.join(d, "job.json")))
        res = json.load(open(os.path.join(d, f"result-{rec['id']}.json")))
        spec = json.load(open(os.path.join(d, "spec.json")))
        info[key] = (rec, res, spec)
        lat.append(res["started_at"] - rec["submitted_at"])
    # Driver reaction: an upstream job's end → its downstream job's submission.
    for key, (rec, res, spec) in info.items():
        for up in spec["planned"]["upstream"].values():
            if up in info:
                react.append(rec["submitted_at"] - info[up][1]["finished_at"])
    ex = v["executor"]
    n = len(lat)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                  if l.startswith("Model name")), "?")
    print(f"CPU: {model}; {n} jobs ({a.experiments} experiments), poll interval {a.poll} s")
    print(f"wall {wall:.1f} s for {n} stages: {wall / n:.2f} s per stage")
    print(f"submit-to-start latency: min {min(lat):.2f} s (node free), "
          f"median {statistics.median(lat):.2f} s (queued behind the node's {n} jobs)")
    print(f"upstream end to downstream submission (driver reaction): "
          f"median {statistics.median(react):.2f} s, max {max(react):.2f} s")
    print(f"polls {ex['polls']}, squeue calls {ex['squeue_calls']}: "
          f"{ex['polls'] / wall * 60:.1f} polls/min")
    shutil.rmtree(proj, ignore_errors=True)


if __name__ == "__main__":
    main()
