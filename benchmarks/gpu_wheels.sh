#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has jax 0.11 + CUDA, optax, orbax, chex, numpy, PyYAML,
# safetensors, tqdm; no internet), for its Python 3.12, into .whl/ (git-ignored; the device
# call carries it). flax is pinned to the version this project is tested with, whatever the
# image holds. Run from the repository root on this machine (it needs the internet or pip's
# cache).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "flax==${FLAX_VERSION:-0.12.12}"
ls -l .whl
