#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels scripts/gpu_check.sh needs on a GPU box that has a CUDA
# torch but no package index (such as the lent H100/H200 machines, whose python3 is 3.12 with torch, numpy,
# sentencepiece, PyYAML, safetensors, tqdm and pytest). They go to .whl/ (ignored by git); carry that folder
# to the GPU box, where gpu_check.sh installs them with pip --no-index into .gpu-site/.
#
#   bash scripts/gpu_wheels.sh            # wheels for CPython 3.12 on x86-64 Linux
#   bash scripts/gpu_wheels.sh 3.11       # another Python version
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${1:-3.12}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# The versions the project is tested with; pydantic and pydantic-core must match each other exactly.
PACKAGES=(
  websockets==17.4 aiomqtt==2.5.1 paho-mqtt==2.2.0
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0
  soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  pytest-asyncio==1.5.0
)
PLATFORMS=()
for n in 17 24 27 28 31 34; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
echo "== $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU box with the checkout"
