"""The CPU demo (`etalk demo`, docs/ARCHITECTURE.md §6): every stage at toy size on synthetic
talking faces, then videos of two held-out identities saying held-out speech in two emotions.

  etalk demo                  samples the embedded checkpoint (etalk_jax/demo/checkpoint/, which
                              `etalk demo --train` trained with this config) and reports: ~2 min
  etalk demo --train          trains every stage from scratch first (~21 min on a 2-core CPU)
                              and packs the result as the embedded one is
                              (demo_out/checkpoint_packed)
  etalk demo --quick          a smoke run of --train at toy size (the tests run it)

A change to the "full" variant below refuses the embedded checkpoint (its provenance records the
config it was trained with): run `etalk demo --train`, then replace etalk_jax/demo/checkpoint/
with its demo_out/checkpoint_packed.

Goals (issue 22): over the 4 videos, generated lip sync (correlation of the mouth opening read
from the frames with the speech envelope) >= 0.35 with the no-audio baseline's mean within
+-0.1 of 0; emotion accuracy >= 0.5 (chance 0.125). `etalk demo` of the embedded checkpoint
(stop 31's 2-core machine; `--train` with this config, 19.9 min of training, 20.8 in all): lip sync
0.668 +- 0.050 generated against 0.007 +- 0.008 without the audio (ground truth 0.725); emotion
accuracy 0.500 +- 0.500 (sad 1.00 / 1.00, angry 0.00 / 0.00: the expression encoder barely tells
angry from sad, see docs/notes/2026-12-06-demo-embedded-checkpoint.md; ground truth 0.775);
1.9 min.
What the lip sync needed, besides what made the toy ETHD read its lip tokens at all
(docs/notes/2026-12-01-demo-reads-lip-tokens.md: first-frame references, standardised l_a,
utterance-normalised speech, faces at 1.5x): a PD-FGC that encodes the mouth. The random tiny
one did not (its adapted l_v followed the mouth at r = 0.22 on held-out identities), so every
later stage learnt from noise (lip sync -0.061 against -0.033); the demo now pretrains it first
(`pdfgc` steps, etalk_jax/demo/pdfgc_standin.py: r = 0.95). docs/notes/2026-12-06-demo-chain.md
has each link's figures; docs/notes/2026-12-06-demo-emotion-high-sigma.md how ETHD came to
render the emotion (training at high noise only, every reference neutral). The stage configs are
configs/<stage>.py:tiny with the overrides below.
"""

import ml_collections

# The frozen encoders have no pretrained weights offline: random tiny ones, saved once and read by
# every stage (the same way converted checkpoints are).
TINY_WAV2VEC2 = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=32, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4)
AUDIO_FEATURES = dict(chunk_frames=100, context_frames=10, bucket_frames=(60, 100))


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "quick"):
    raise ValueError(f"configs/tiny.py knows the variants 'full' and 'quick', not {variant!r}.")
  quick = variant == "quick"
  config = ml_collections.ConfigDict()
  # data_pipeline.synthetic.SyntheticSpec; whole identities are held out for the test split (4 of
  # 20). 20 identities with one take each (not 10 with two: the same 160 clips): the expression
  # encoder then tells emotions apart on faces it never saw at 0.29 instead of 0.22 (0.50 with
  # the stand-in's recolouring).
  config.data = dict(
      identities=4 if quick else 20,
      emotions=("neutral", "happy", "angry", "sad") if quick else
      ("happy", "angry", "sad", "surprised", "fearful", "disgusted", "worried", "neutral"),
      levels=(3,), takes=1, num_frames=48 if quick else 100, resolution=64,
      seed=0, test_fraction=0.5 if quick else 0.2,
      # Heads sway at 0.3 of the default: the mouth is then 66% (not 38%) of the change in the
      # mouth region, and stays inside the mouth box the report reads from the portrait. Faces
      # at 1.5x the training crop's size: the mouth spans ~4x1.5 latent cells, not ~1.5x1.
      head_motion=0.3, face_scale=1.5)
  config.wav2vec2 = TINY_WAV2VEC2
  config.wavlm = TINY_WAV2VEC2
  config.audio_features = AUDIO_FEATURES
  # Steps per stage (configs/<stage>.py:tiny gives the rest). pdfgc: the PD-FGC stand-in's
  # pretraining (etalk_jax/demo/pdfgc_standin.py), batches of 64, ~75 s. ETHD: 2000 steps (~17 min
  # here) of the emotion-teaching schedule below; at 250 it renders no emotion, at 1000 emotion
  # accuracy 0.455 (docs/notes/2026-12-06-demo-emotion-high-sigma.md).
  config.steps = dict(pdfgc=2, encoders=2, projector=2, dicte=2, ethd=2, ser=2) if quick else dict(
      pdfgc=400, encoders=200, projector=300, dicte=300, ethd=2000, ser=200)
  config.video_window = 8  # frames per training window and per sampling window
  # Every stage's reference is its clip's first frame, as the demo's portrait is: the speech has
  # not started, the mouth is shut ("keyframe": a random frame of the clip, open or shut).
  config.reference_frame = "first"
  # The ETHD stage's references all come from the identity's neutral clip (the demo's portrait is
  # a neutral frame), so that every window teaches EDI an emotion change: with same-clip ones the
  # reference already shows the emotion and the target (latent minus reference) holds none.
  config.cross_clip_reference = 1.0
  # Where cross-clip references come from ("": any other emotion); the neutral clip's windows take
  # another emotion's (the change back to neutral).
  config.cross_clip_emotion = "neutral"
  # The ETHD stage's training, as the probes of docs/notes/2026-12-06-demo-emotion-high-sigma.md
  # found it learns the emotion: noise levels near sigma 55 only (ln sigma ~ N(4, 0.3^2)), where
  # the noisy input tells nothing and only the conditions say what the face does (below sigma ~8
  # ETHD reads the emotion off the noisy input, so those samples teach no conditioning; the low
  # levels stay as the encoder stage's renderer learnt them); lip weight 5 (20 let the mouth
  # crowd the face out of the loss). The stage always trains on ground-truth expressions only
  # (demo/wiring.py: Di-CTE's e_a are not read, so Di-CTE trains beside it).
  config.ethd_training = dict(p_mean=4.0, p_std=0.3, lip_weight=5.0, lr=1e-3, batch_size=2)
  # Batches on which the encoder and ETHD stages measure their lip stream's statistics (ETHD
  # standardises l_v / l_a with them: their variation over time is ~5% of their size).
  config.lip_statistics_batches = 2 if quick else 16
  # The latent codec: 4x4 patches on their first principal components (a linear autoencoder
  # fitted on training frames; no pretrained VAE offline). 12 channels keep 99% of the variance.
  config.latent_channels = 12
  # ETHD denoises each frame's latent minus the portrait's, scaled to unit std (the scale is
  # measured on training clips): the toy UNet then models motion only instead of redrawing the
  # identity, which it does not learn in the CPU budget ("absolute": SVD's target).
  config.latent_target = "reference_relative"
  # Sampling: Euler steps, window overlap, the two emotions generated for the held-out identity.
  # 8 Euler steps: lip sync 0.105 vs -0.072 without the audio, 16: 0.114 vs -0.062 (stop 14's
  # checkpoint, resampled); half the time.
  config.sample_steps = 4 if quick else 8
  # Karras range: EDM's sigma_max for unit-scale latents (SVD's 700 is for 512² video latents).
  config.sigma_max = 80.0
  config.sigma_min = 0.002
  config.window_overlap = 2
  config.emotions = ("sad", "angry")
  # The report's videos: this many held-out identities (the test split's first, by name), each
  # in every one of `emotions`, with and without the audio.
  config.held_out_identities = 2
  return config
