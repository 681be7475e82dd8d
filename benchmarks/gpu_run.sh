#!/usr/bin/env bash
# The GPU figures in one command, on a fresh GPU machine holding this working tree (and, where it has
# no package index, the wheels benchmarks/gpu_wheels.sh downloaded into outputs/gpu-wheels):
#
#   bash benchmarks/gpu_run.sh [benchmarks/gpu_suite.py arguments]
#
# installs the wheels into a folder of its own (no index, no dependencies: the machine's CUDA torch
# stays), prints the versions it runs with, runs benchmarks/gpu_suite.py under a hard timeout
# (SINGER_GPU_TIMEOUT, 560 s; the suite's own budget is 480 s), and leaves results.json, results.md
# and log.txt in $OUT if set, else outputs/gpu. Exit status: the suite's; 124 after the hard timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu}
python=${PYTHON:-python3}
wheels=${SINGER_GPU_WHEELS:-outputs/gpu-wheels}
mkdir -p "$out"
rm -f "$out/results.json" "$out/results.md"  # a failed run must not leave an earlier one's results

run() {
  echo "== $(date -u '+%F %T UTC'); GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  if compgen -G "$wheels/*.whl" >/dev/null; then
    local site=${TMPDIR:-/tmp}/singer-gpu-site
    echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # Nothing is downloaded: models are built from configs, the data part reads a file it writes.
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  "$python" - <<'PY'
import importlib.metadata as metadata
names = ["torch", "torchvision", "transformers", "peft", "accelerate", "datasets", "huggingface-hub", "tokenizers", "pyarrow", "numpy"]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
print("== " + ", ".join(f"{name} {version(name)}" for name in names))
PY
  timeout --kill-after=20 "${SINGER_GPU_TIMEOUT:-560}" "$python" benchmarks/gpu_suite.py --output_dir "$out" "$@"
  local status=$?
  if [ ! -f "$out/results.json" ]; then
    echo "error: no results (exit status $status); a package missing above? Bring the wheels: bash benchmarks/gpu_wheels.sh where pip works"
  fi
  return $status
}

run "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
