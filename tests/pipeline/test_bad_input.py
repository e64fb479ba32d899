"""`etalk sample` with bad and with unusual input (issue 21, item 4), through `cli.main` on the
tiny random checkpoint of test_pipeline.py.

Bad input (the table BAD_INPUTS: portraits, speech, arguments, --out, checkpoints) must give one
line naming the input and the fix, exit 2, before the checkpoint loads (loading is refused in
that test), and leave nothing at --out (nor a temporary file beside it). Unusual but valid input
(several faces: the largest, with a warning; 8 kHz mono and 44.1 kHz stereo speech; an output
folder that does not exist yet, which is created) must give a video. Real MediaPipe detection
on the scikit-image astronaut: a blank or noise image has no face, the astronaut pasted twice
at two sizes has two.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile
from scipy.signal import resample_poly
from skimage import data as skimage_data

from data_pipeline import synthetic
from data_pipeline.media import probe
from etalk_jax import cli
from etalk_jax.errors import UserError
from etalk_jax.pipeline import EmotiveTalkPipeline, inputs as pipeline_inputs, save_pipeline
from etalk_jax.pipeline.command import check_output
from tests.pipeline.test_pipeline import RESOLUTION, tiny_components

# The astronaut's head and shoulders: MediaPipe's short-range detector wants faces that fill a
# good part of the frame.
HEAD = skimage_data.astronaut()[0:300, 80:380]
LARGE_FACE_LEFT = 320  # the larger copy's left edge in the two-face portrait


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
  return save_pipeline(tmp_path_factory.mktemp("pipeline") / "ckpt", **tiny_components())


def _wav(path: Path, rate: int, samples: np.ndarray) -> Path:
  wavfile.write(path, rate, samples)
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoint) -> dict[str, Path]:
  """Every input the tests give, by name."""
  root = tmp_path_factory.mktemp("inputs")
  out: dict[str, Path] = {"checkpoint": checkpoint}

  def image(name: str, array: np.ndarray) -> None:
    out[name] = root / f"{name}.png"
    Image.fromarray(array).save(out[name])

  image("portrait", np.asarray(Image.fromarray(HEAD).resize((256, 256))))
  two = np.full((320, 640, 3), 128, np.uint8)
  two[:, LARGE_FACE_LEFT:] = np.asarray(Image.fromarray(HEAD).resize((320, 320)))
  two[80:, :240] = np.asarray(Image.fromarray(HEAD).resize((240, 240)))
  image("two_faces", two)
  image("noise", np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8))
  image("blank", np.zeros((256, 256, 3), np.uint8))
  whole = out["portrait"].read_bytes()
  out["truncated_png"] = root / "truncated.png"
  out["truncated_png"].write_bytes(whole[:len(whole) // 3])
  out["text_png"] = root / "notes.png"
  out["text_png"].write_text("not an image")

  # One second of the synthetic renderer's speech-like audio, 16 kHz int16 mono.
  speech = synthetic.make_clip(synthetic.make_identity(0), "neutral", 1, num_frames=25,
                               resolution=RESOLUTION).audio
  out["speech"] = _wav(root / "speech.wav", 16000, speech)
  out["speech_8k"] = _wav(root / "speech_8k.wav", 8000,
                          resample_poly(speech.astype(np.float64), 1, 2).astype(np.int16))
  at_44k = resample_poly(speech.astype(np.float64), 441, 160).astype(np.int16)
  out["speech_44k_stereo"] = _wav(root / "speech_44k_stereo.wav", 44100,
                                  np.stack([at_44k, at_44k // 2], axis=1))
  out["speech_short"] = _wav(root / "speech_short.wav", 16000, speech[:1600])
  out["speech_no_samples"] = _wav(root / "speech_no_samples.wav", 16000, np.zeros(0, np.int16))
  out["speech_empty"] = root / "speech_empty.wav"
  out["speech_empty"].write_bytes(b"")
  out["speech_corrupt"] = root / "speech_corrupt.wav"
  out["speech_corrupt"].write_bytes(
      np.random.default_rng(1).integers(0, 256, 5000, np.uint8).tobytes())

  out["empty_checkpoint"] = root / "empty_checkpoint"
  out["empty_checkpoint"].mkdir()
  for name, edit in (("version_2_checkpoint", lambda record: json.dumps({**record, "version": 2})),
                     ("broken_checkpoint", lambda record: "{\"format\": \"etalk_pipeline\", ")):
    copy = root / name
    copy.mkdir()
    record = json.loads((checkpoint / "pipeline.json").read_text())
    (copy / "pipeline.json").write_text(edit(record))  # pipeline.json alone is read first
    out[name] = copy
  out["a_file"] = root / "a_file"
  out["a_file"].write_text("in the way")
  return out


def argv(files, **options) -> list[str]:
  """`etalk sample` arguments: the good portrait, speech and checkpoint unless `options` (option
  name without dashes, underscores for dashes; `out` is needed) says otherwise; a value that
  names a file of `files` is replaced by its path."""
  given = {"portrait": files["portrait"], "audio": files["speech"],
           "checkpoint": files["checkpoint"], **options}
  args = ["sample", "--no-progress"]
  for option, value in given.items():
    args += [f"--{option.replace('_', '-')}", str(files.get(value, value))]
  return args


# (id, options, the message it must contain). Options and message are formatted with the paths:
# {out} the (empty) output folder and any name of `files` in options; {portrait}, {audio},
# {checkpoint}, {out} in the message: what the command was given. Each message names the input
# and says what to give instead.
BAD_INPUTS = [
    ("portrait-missing", {"portrait": "{out}/absent.png"},
     "--portrait {portrait} does not exist; give a photo (PNG or JPEG) with one face."),
    ("portrait-folder", {"portrait": "{empty_checkpoint}"},
     "--portrait {portrait} is a folder; give a photo (PNG or JPEG) with one face."),
    ("portrait-unreadable", {"portrait": "{truncated_png}"},
     "the portrait {portrait} could not be read as an image (image file is truncated); give a "
     "PNG or JPEG photo."),
    ("portrait-not-an-image", {"portrait": "{text_png}"},
     "the portrait {portrait} could not be read as an image (cannot identify image file"),
    ("portrait-noise-no-face", {"portrait": "{noise}"},
     "no face found in the portrait {portrait}; use a photo with one clearly visible, frontal "
     "face"),
    ("portrait-blank-no-face", {"portrait": "{blank}"},
     "no face found in the portrait {portrait}; use"),
    ("speech-missing", {"audio": "{out}/absent.wav"},
     "--audio {audio} does not exist; give a speech file (wav, flac, mp3, m4a or mp4)."),
    ("speech-empty-file", {"audio": "{speech_empty}"},
     "{audio} is empty (0 bytes); give a file that holds speech."),
    ("speech-no-samples", {"audio": "{speech_no_samples}"},
     "{audio} holds no audio samples; give a file that holds speech."),
    ("speech-0.1s", {"audio": "{speech_short}"},
     "{audio} lasts 0.100 s; the speech must last at least 0.2 s."),
    ("speech-corrupt", {"audio": "{speech_corrupt}"},
     "{audio} could not be decoded as audio (Invalid data found when processing input); it is "
     "damaged or not audio. Give a wav, flac, mp3, m4a or mp4 file that plays."),
    ("emotion-unknown-word", {"emotion": "elated"},
     "--emotion: unknown emotion 'elated'; use one of happy, angry, sad, surprised, fearful, "
     "disgusted, worried, neutral. For an emotion in other words, use --emotion-text"),
    ("intensity-above-range", {"emotion": "sad", "intensity": "2"},
     "emotion intensity 2.0 is out of range; give a number from 0 (neutral) to 1"),
    ("intensity-negative", {"emotion": "sad", "intensity": "-0.5"},
     "emotion intensity -0.5 is out of range; give a number from 0"),
    ("steps-zero", {"steps": "0"},
     "steps must be at least 1, got 0; give a whole number of ETHD sampling steps (--steps"),
    ("steps-negative", {"steps": "-3"}, "steps must be at least 1, got -3; give a whole number"),
    ("guidance-below-one", {"guidance": "0.5"},
     "guidance must be a number of at least 1 (1 switches it off), got 0.5."),
    ("resolution-not-the-checkpoints", {"resolution": "128"},
     "--resolution 128 does not match the checkpoint {checkpoint}, which generates 64x64; pass "
     "--resolution 64 or another checkpoint."),
    ("out-not-mp4", {"out": "{out}/talk.avi"},
     "--out {out}: the output is an H.264 mp4; give a path ending in .mp4."),
    ("out-is-a-folder", {"out": "{out}/folder.mp4"},
     "--out {out} is a folder; give a file path ending in .mp4."),
    ("out-folder-cannot-be-made", {"out": "{a_file}/new/talk.mp4"},
     "--out {out}: {a_file} is a file, so the folder {a_file}/new cannot be created; give an "
     "output path in a folder."),
    ("checkpoint-missing", {"checkpoint": "{out}/absent_checkpoint"},
     "{checkpoint}/pipeline.json is not an etalk pipeline checkpoint: the file does not exist. "
     "Give the folder save_pipeline of this etalk-jax wrote"),
    ("checkpoint-empty-folder", {"checkpoint": "{empty_checkpoint}"},
     "{checkpoint}/pipeline.json is not an etalk pipeline checkpoint: the file does not exist."),
    ("checkpoint-other-version", {"checkpoint": "{version_2_checkpoint}"},
     "{checkpoint}/pipeline.json is an etalk pipeline checkpoint of version 2; this etalk-jax "
     "reads version 1. Give the folder save_pipeline of this etalk-jax wrote"),
    ("checkpoint-broken-json", {"checkpoint": "{broken_checkpoint}"},
     "{checkpoint}/pipeline.json is not an etalk pipeline checkpoint (not valid JSON"),
]


@pytest.mark.parametrize("options, expected", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_message_before_anything_loads(files, tmp_path, capsys, monkeypatch,
                                                        options, expected):
  def loading(*args, **kwargs):
    raise AssertionError("the checkpoint loaded before the bad input was refused")

  monkeypatch.setattr(EmotiveTalkPipeline, "load", loading)
  out_folder = tmp_path / "out"
  (out_folder / "folder.mp4").mkdir(parents=True)
  options = {name: value.format(out=out_folder, **files) for name, value in options.items()}
  # By default an output in a folder yet to be made: a refused run must not make it.
  args = argv(files, **{"out": out_folder / "new" / "talk.mp4", **options})
  given = {option.lstrip("-").replace("-", "_"): value
           for option, value in zip(args[2::2], args[3::2])}
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("etalk sample: error: ") and err.count("\n") == 1, err  # one line
  assert expected.format(**{**files, **given}) in err, err
  # Nothing written: the output folder holds what it held (no video, no temporary file, no
  # new folder).
  assert [path.name for path in out_folder.iterdir()] == ["folder.mp4"]
  assert files["a_file"].read_text() == "in the way"


def _sample(files, capsys, **options) -> str:
  assert cli.main(argv(files, **options)) == 0, capsys.readouterr().err
  return capsys.readouterr().out


def _check_video(out: Path, seconds: float = 1.0) -> None:
  info = probe(out)
  assert (info.width, info.height, info.has_audio) == (RESOLUTION, RESOLUTION, True)
  assert abs(info.duration - seconds) < 0.1
  assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_several_faces_take_the_largest_with_a_warning_and_8khz_speech_works(
    files, tmp_path, capsys, caplog, monkeypatch):
  used = []
  crop_face = pipeline_inputs.crop_face
  monkeypatch.setattr(pipeline_inputs, "crop_face",
                      lambda image, landmarks, resolution: used.append(landmarks) or crop_face(
                          image, landmarks, resolution))
  out = tmp_path / "talk.mp4"
  with caplog.at_level(logging.WARNING):
    printed = _sample(files, capsys, out=out, portrait="two_faces", audio="speech_8k")
  assert "25 frames" in printed
  _check_video(out)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert f"2 faces found in the portrait {files['two_faces']}; using the largest" in " ".join(
      warnings)
  # The larger copy's face (the right half), not the smaller one.
  assert len(used) == 1 and used[0][:, 0].min() > LARGE_FACE_LEFT


def test_stereo_44khz_speech_into_an_output_folder_that_does_not_exist(files, tmp_path, capsys):
  out = tmp_path / "made" / "on" / "demand" / "talk.mp4"
  assert "25 frames" in _sample(files, capsys, out=out, audio="speech_44k_stereo")
  _check_video(out)


def test_a_folder_input_of_the_python_api_is_named(tmp_path):
  """The pipeline's readers, below the command's checks, name a folder given as speech."""
  with pytest.raises(ValueError, match=f"{tmp_path} is a folder; give a wav"):
    pipeline_inputs.read_speech(tmp_path)


def test_the_out_check_creates_nothing(tmp_path):
  """The --out check only looks: a missing folder is made by the video's writer, not here."""
  target = tmp_path / "new" / "deeper" / "talk.mp4"
  assert check_output(target) == target
  assert list(tmp_path.iterdir()) == []


def test_a_faceless_emotion_image_is_named_as_such(tmp_path):
  noise = tmp_path / "noise.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)).save(noise)
  image, name = pipeline_inputs.read_image(noise, "the emotion image")
  with pytest.raises(UserError, match=f"no face found in the emotion image {noise}; use a photo"):
    pipeline_inputs.detect_face(image, name)


def test_a_still_image_is_not_a_driving_video(tmp_path):
  photo = tmp_path / "face.png"
  Image.fromarray(skimage_data.astronaut()).save(photo)
  with pytest.raises(UserError, match="is a still image .*--emotion-image"):
    pipeline_inputs.check_driving_video(photo)
