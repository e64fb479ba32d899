"""Synthetic talking faces: procedural, deterministic clips with exact per-frame ground truth.

Every clip is a function of (seed, identity, emotion, level, number of frames, resolution):
- identities differ in face shape, skin, hair (colour and style), eyes, lips, background and voice;
- speech-like audio: syllables of voiced harmonics shaped by vowel formants, consonant closures and
  noise bursts, amplitude envelopes, pauses between phrases; prosody (pitch, range, rate, energy,
  tremor, brightness) depends on the emotion, so speech emotion is learnable too;
- the mouth opening follows the articulation that made the sound (vowel openness while voicing,
  closed on plosives and nasals, shut in pauses), so lip sync is exact by construction;
- each of the eight emotions moves brows, eye opening, mouth corners and width, upper lip and jaw,
  scaled by the MEAD-like intensity level 1..3 (alpha 0.5, 1.0, 1.5);
- blinks and a small head sway (yaw, pitch, roll, translation, scale) with nods on stressed
  syllables.

Faces are drawn from MediaPipe's 478-point mesh (a frontal template, symmetrised), deformed by those
parameters and projected, so the stored landmarks are exactly the ones the renderer drew: masks,
crops and mouth measurements work as on real data, with no detector. Ground truth per frame:
`mouth_open` (0 shut .. 1 wide), `eye_open` (0 shut .. ~1.6 wide), `pose` (yaw, pitch, roll in
degrees, tx, ty in crop fractions, scale); per clip: emotion and level.

Modules: `identity` (who), `face_mesh` (the template mesh, expressions and projection), `speech`
(audio and articulation), `motion` (head pose and blinks), `render` (the rasteriser), `clips`
(one clip; a dataset's spec), `mead` (a spec written in MEAD's folder layout).
"""

from data_pipeline.synthetic.clips import SyntheticClip, SyntheticSpec, make_clip
from data_pipeline.synthetic.identity import Identity, make_identity
from data_pipeline.synthetic.mead import write_mead_layout

__all__ = ["Identity", "SyntheticClip", "SyntheticSpec", "make_clip", "make_identity",
           "write_mead_layout"]
