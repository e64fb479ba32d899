"""Speech encoders (wav2vec2, WavLM) in Flax NNX, their transformers converters, and the
frame-aligned audio windows `A_w` that EmotiveTalk's V-AID reads (docs/ARCHITECTURE.md
section 3.1)."""

from etalk_jax.audio.features import (
  AudioError,
  AudioFeatures,
  FeatureConfig,
  frame_windows,
  load_speech,
  normalize,
)
from etalk_jax.audio.params import (
  convert_wav2vec2_command,
  convert_wavlm_command,
  export_transformers,
  load_wav2vec2,
  load_wavlm,
  save_speech_encoder,
  to_transformers,
  wav2vec2_from_transformers,
  wavlm_from_transformers,
)
from etalk_jax.audio.wav2vec2 import AudioEncoderOutput, Wav2Vec2, Wav2Vec2Config
from etalk_jax.audio.wavlm import WavLM, WavLMConfig

__all__ = [
    "AudioEncoderOutput", "AudioError", "AudioFeatures", "FeatureConfig", "Wav2Vec2",
    "Wav2Vec2Config", "WavLM", "WavLMConfig", "convert_wav2vec2_command", "convert_wavlm_command",
    "export_transformers", "frame_windows", "load_speech", "load_wav2vec2", "load_wavlm",
    "normalize", "save_speech_encoder", "to_transformers", "wav2vec2_from_transformers",
    "wavlm_from_transformers",
]
