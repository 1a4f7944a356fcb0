#!/usr/bin/env bash
# Runs perf/scaling.py on a bare many-core machine that has Python 3.12, numpy, numba and
# pyarrow but nothing else and no network. Prepare on a networked machine first:
#   .whl/   wheels of grpcio, grpcio-health-checking, grpcio-reflection, protobuf for the
#           target Python (pip download --no-deps --only-binary=:all: --python-version 3.12 ...)
#   .tools/ bin/h2load and lib/ (libnghttp2, libev, libjemalloc, libssl, libcrypto) copied
#           from Debian's nghttp2-client, and models/ holding a built `fraud` package
# then copy the tree over and run:  bash perf/device_scaling.sh OUT_DIR
set -euo pipefail
out=${1:-/tmp/riskwire-scaling}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
# Make the top-level folders importable as riskwire.* without installing the project.
for d in kernels pipeline server shadow clients protos; do ln -sfn "../$d" "riskwire/$d"; done
export PYTHONPATH="/tmp/site:$PWD" LD_LIBRARY_PATH="$PWD/.tools/lib"
# Compile the Numba kernels once, so workers start from the cache.
python3 -c "from riskwire.kernels import features; features.warmup()
from riskwire.pipeline.package import load_package, list_versions
from pathlib import Path
v = list_versions(Path('.tools/models'), 'fraud')[-1]
load_package(f'.tools/models/fraud/{v}').forest.warmup()"
python3 perf/scaling.py --models .tools/models --h2load .tools/bin/h2load \
  --workers 1,2,4,8,14 --duration 5 --warmup 2 --out "$out" --json
