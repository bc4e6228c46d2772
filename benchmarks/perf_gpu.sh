#!/bin/bash
# Issue 7's GPU suite (benchmarks/suites/perf_gpu.py) on an H100/H200 without network access.
#
#   benchmarks/perf_gpu.sh fetch   with network: the wheels the GPU image lacks, into .whl/
#   benchmarks/perf_gpu.sh run     on the GPU, .whl/ copied with the checkout: install them,
#                                  run and report the suite
#
# The GPU image is expected to have jax, flax, optax, orbax, nvidia-ml-py and scikit-learn,
# not grain (and its array-record, portpicker), ml_collections, qwix or tensorboardX. jaxbig
# itself runs from the checkout (PYTHONPATH), uninstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS='grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 qwix==0.1.8 tensorboardX==2.6.5'
case "${1:-}" in
  fetch)
    grep -qsx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl $WHEELS ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    out="${OUT:-runs/bench}/perf_gpu"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    python3 -m jaxbig bench benchmarks/suites/perf_gpu.py --out "$out"
    python3 -m jaxbig report "$out" ;;
  *) echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
