#!/usr/bin/env bash
# Downloads, where pip reaches a package index, the wheels a GPU machine without one needs to run
# benchmarks/gpu_suite.py beside its own CUDA torch, at the versions this checkout's .venv is tested with:
#
#   bash benchmarks/gpu_wheels.sh [more package names]     # -> outputs/gpu-wheels/ (~16 MB)
#
# then bring outputs/gpu-wheels along with the working tree; benchmarks/gpu_run.sh installs them there.
# The wheels are for CPython 3.12 on x86-64 Linux (SINGER_GPU_PYTHON=3.11 etc. for another Python).
# Carried: what a CUDA PyTorch image usually lacks (datasets and its dill and multiprocess) or holds at
# another version (transformers, peft, accelerate, fsspec within datasets' bounds). Left to the image:
# torch, torchvision, numpy, pyarrow (55 MB; datasets wants >= 24), huggingface-hub, tokenizers,
# safetensors, scipy, pillow, pyyaml: the suite prints their versions before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
destination=${SINGER_GPU_WHEELS:-outputs/gpu-wheels}
packages=(transformers peft accelerate datasets dill multiprocess fsspec "$@")
pins=$("$python" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${packages[@]}")
rm -rf "$destination"  # one version of each: two would stop the install
mkdir -p "$destination"
echo "downloading $pins"
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$destination" \
  --python-version "${SINGER_GPU_PYTHON:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  $pins
ls -l "$destination"
du -sh "$destination"
