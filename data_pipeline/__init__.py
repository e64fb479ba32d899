"""Talking-head data: face processing, preparation into TFDS/ArrayRecord, Grain loading, synthetic
faces.

Conventions shared by every module here (docs/ARCHITECTURE.md §5):
- video at 25 fps; audio 16 kHz mono, so frame i covers samples [640 i, 640 (i + 1)) and its audio
  is the audio at i/25 s;
- landmarks are MediaPipe's 478-point face mesh, stored in crop coordinates normalised to [0, 1]
  (x right, y down), float16;
- emotions are the paper's eight keywords, plus MEAD's `contempt` and `unknown` (HDTF, plain
  folders).

Importing this package is cheap: heavy libraries (PyAV, MediaPipe, TFDS, Grain) load in the modules
that use them.
"""

FPS = 25
SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
NUM_LANDMARKS = 478
# Records and media hold 16-bit PCM: divided by this, samples lie in [-1, 1).
INT16_SCALE = 32768.0

# The paper's emotion keywords, in the paper's order (the emotion codebook has one entry per
# keyword).
EMOTIONS = ("happy", "angry", "sad", "surprised", "fearful", "disgusted", "worried", "neutral")
# Labels a record can carry: the keywords, MEAD's extra `contempt`, and `unknown` for unlabelled
# data.
EMOTION_LABELS = EMOTIONS + ("contempt", "unknown")
