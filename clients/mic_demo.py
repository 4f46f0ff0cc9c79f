#!/usr/bin/env python3
"""Live captions of your microphone in the terminal: the same program as ``streamer mic``.

    python clients/mic_demo.py                                # default microphone, bundled model, in process
    python clients/mic_demo.py --list-devices                 # what can be captured from (* = default)
    python clients/mic_demo.py --device 2 --model path/to/model.nemo
    python clients/mic_demo.py --url ws://127.0.0.1:8765      # recognize on a running daemon (no torch here)
    python clients/mic_demo.py --url ws://gpu-box:8765 --stream desk --json

The partial line is rewritten in place and finals scroll; Ctrl-C prints the last final and exits.
Without a microphone it says so in one line. Needs streamer installed (``pip install -e .``) and the
PortAudio library (``apt install libportaudio2``). The code is ``streamer mic``'s, in ``streamer/mic_command.py``.
"""

import sys

from streamer.mic_command import main

if __name__ == "__main__":
    sys.exit(main())
