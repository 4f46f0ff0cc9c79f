#!/usr/bin/env bash
# The one-command GPU check: CUDA parity with the CPU on the goldens, `streamer bench --device cuda` at 1 to 1024
# streams, a `streamer loadtest` capacity search against `streamer serve` on the GPU, and offline RTFx of a
# parakeet-tdt-0.6b-shaped model, eager and torch.compile'd. At most about 8 minutes; prints one table at the end and
# writes gpu_check.json and gpu_check.txt to $OUT when it is set (or --out DIR). README, section GPU, says how to
# read the table.
#
#   bash scripts/gpu_check.sh                      # on a GPU box
#   bash scripts/gpu_check.sh --device cpu --quick # every stage on the CPU with tiny sizes (about two minutes)
#   bash scripts/gpu_check.sh --dry-run            # the plan; nothing runs
#
# Python: $STREAMER_PYTHON, else .venv/bin/python, else python3; it needs a CUDA build of torch for --device cuda.
# streamer's other dependencies come from that Python, else from wheels in .whl/ (scripts/gpu_wheels.sh fetches
# them where PyPI is reachable), else from `STREAMER_SKIP_APT=1 bash setup.sh` when STREAMER_SETUP=1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

pick_python() {
  if [ -n "${STREAMER_PYTHON:-}" ]; then echo "$STREAMER_PYTHON"
  elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then echo .venv/bin/python
  else command -v python3; fi
}
PY=$(pick_python)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEPS="import websockets, aiomqtt, pydantic_settings, soxr, soundfile, sentencepiece, yaml, numpy"

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY has no torch. Set STREAMER_PYTHON to a Python with a CUDA build of torch, or run" >&2
  echo "  STREAMER_SKIP_APT=1 STREAMER_TORCH='torch==2.13.0' bash setup.sh  (PyPI's Linux wheels are CUDA builds)" >&2
  exit 2
fi
if ! "$PY" -c "$DEPS" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing streamer's dependencies from .whl/ into .gpu-site/ (no index)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu-site .whl/*.whl \
      || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu-site"
  elif [ "${STREAMER_SETUP:-0}" = 1 ]; then
    echo "== STREAMER_SKIP_APT=1 bash setup.sh" >&2
    STREAMER_SKIP_APT=1 bash setup.sh || { echo "gpu_check: setup.sh failed" >&2; exit 2; }
    PY=.venv/bin/python
  fi
  if ! "$PY" -c "$DEPS" 2>/dev/null; then
    echo "gpu_check: $PY lacks streamer's dependencies ($("$PY" -c "$DEPS" 2>&1 | tail -1))." >&2
    echo "  Without a package index: run 'bash scripts/gpu_wheels.sh' where PyPI is reachable and bring .whl/ along." >&2
    echo "  With one: STREAMER_SETUP=1 bash scripts/gpu_check.sh (runs STREAMER_SKIP_APT=1 bash setup.sh)." >&2
    exit 2
  fi
fi
"$PY" -c "import torch; print('== python', __import__('sys').version.split()[0], '| torch', torch.__version__,
  '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" >&2
case " $* " in
  *" --device cpu"*|*" --dry-run "*) ;;
  *) if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
       echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') in $PY sees no CUDA GPU: install a" >&2
       echo "  CUDA build of torch (README, section GPU) or set STREAMER_PYTHON to a Python that has one;" >&2
       echo "  'bash scripts/gpu_check.sh --device cpu --quick' checks the script itself on the CPU." >&2
     fi ;;  # the check still runs: its table says the same in its setup row
esac
export PYTHONUNBUFFERED=1
exec timeout --kill-after=20 "${STREAMER_GPU_CHECK_TIMEOUT_S:-540}" "$PY" -m streamer.gpu_check "$@"
