"""Multi-source emotion control (docs/ARCHITECTURE.md §3.10): text -> keyword, the codebook, and the
speech-emotion head. CPU, tiny models: the codebook command runs on the tiny synthetic set with a
random PD-FGC small encoder; the head learns a toy separable problem."""

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from data_pipeline import EMOTIONS, loader
from data_pipeline.builders import synthetic_talking_heads
from etalk_jax import model_io, records as records_module
from etalk_jax.audio import AudioFeatures, FeatureConfig, WavLM, WavLMConfig
from etalk_jax.emotion import ser
from etalk_jax.emotion.codebook import Codebook, build_codebook, codebook_build_command
from etalk_jax.emotion.keywords import (
  NEGATED,
  check_keyword,
  emotion_name,
  keyword_from_text,
  parse_emotion,
)
from etalk_jax.vision.pdfgc import PDFGC_SMALL, AdaptedPDFGC


def _random_model(build):
  """`build(rngs)` with random weights, without eager init (which compiles one op per shape:
  ~12 s for PD-FGC small on 2 cores). Biases 0, norm scales / running variances 1, running
  means 0, other tensors N(0, 1 / fan_in)."""
  graphdef, state = nnx.split(model_io.abstract(build))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = [str(getattr(key, "key", "")) for key in path if hasattr(key, "key")][-1]
    if name in ("var", "scale"):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ("mean", "bias") or len(leaf.shape) < 2:
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


# --------------------------------------------------------------------------------------------
# Text -> keyword
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, keyword", [
    ("joyful", "happy"), ("She looks really cheerful today", "happy"),
    ("furious", "angry"), ("a bit annoyed", "angry"),
    ("heartbroken and crying", "sad"), ("he was astonished", "surprised"),
    ("terrified of the dark", "fearful"), ("grossed out", "disgusted"),
    ("Anxious about the exam", "worried"), ("calm and expressionless", "neutral"),
    ("fear", "fearful"), ("disgust", "disgusted"), ("surprise", "surprised"),
])
def test_lexicon_maps_synonyms(text, keyword):
  assert keyword_from_text(text) == keyword


def test_each_keyword_maps_to_itself():
  for keyword in EMOTIONS:
    assert keyword_from_text(keyword) == keyword
    assert keyword_from_text(keyword.upper() + "!") == keyword


@pytest.mark.parametrize("text, keyword", [
    ("I am not happy", "sad"), ("I'm not at all happy", "sad"), ("she isn't sad", "happy"),
    ("never angry", "neutral"), ("no fear", "neutral"), ("not calm", "worried"),
    ("not unhappy", "happy"),                   # the negated synonym of sad
    ("no, happy", "happy"), ("not sad but happy", "happy"),  # a clause break ends negation
    ("I don't think I'm happy", "sad"),         # "n't" forms are negators
])
def test_negation_flips(text, keyword):
  assert keyword_from_text(text) == keyword


def test_negated_table_covers_every_keyword():
  assert set(NEGATED) == set(EMOTIONS) and set(NEGATED.values()) <= set(EMOTIONS)


def test_votes_and_ties():
  assert keyword_from_text("angry, furious, but then happy") == "angry"  # 2 votes beat 1
  assert keyword_from_text("first sad, then happy") == "happy"           # tie: the last wins


@pytest.mark.parametrize("text", ["a quiet walk in the park", "", "the content of the report"])
def test_no_emotion_word_raises_with_the_keywords(text):
  with pytest.raises(ValueError) as error:
    keyword_from_text(text)
  message = str(error.value)
  assert repr(text) in message and "--emotion" in message
  assert all(keyword in message for keyword in EMOTIONS)


def test_classifier_hook():
  assert keyword_from_text("whatever", classifier=lambda text: "Joy") == "happy"
  scores = {"anger": 0.1, "sadness": 0.7, "neutral": 0.2}
  assert keyword_from_text("whatever", classifier=lambda text: scores) == "sad"
  seen = []
  keyword_from_text("a sentence", classifier=lambda text: seen.append(text) or "fear")
  assert seen == ["a sentence"]
  for bad in ("love", {"happy": 0.4, "love": 0.6}):
    with pytest.raises(ValueError, match="'love'") as error:
      keyword_from_text("x", classifier=lambda text, bad=bad: bad)
    assert all(keyword in str(error.value) for keyword in EMOTIONS)
  with pytest.raises(ValueError, match="returned a int"):
    keyword_from_text("x", classifier=lambda text: 3)


def test_check_keyword():
  assert check_keyword(" Happy ") == "happy"
  assert [check_keyword(w) for w in ("fear", "surprise", "disgust", "happiness")] == [
      "fearful", "surprised", "disgusted", "happy"]
  with pytest.raises(ValueError, match="unknown emotion 'xyz'; use one of happy, angry, sad"):
    check_keyword("xyz")


# --------------------------------------------------------------------------------------------
# Codebook
# --------------------------------------------------------------------------------------------

DIM = 6


def _labelled_codes(keywords=EMOTIONS, per_keyword=5, seed=0):
  rng = np.random.default_rng(seed)
  centres = {k: rng.normal(size=DIM) * 3 for k in keywords}
  codes = np.concatenate([centres[k] + 0.1 * rng.normal(size=(per_keyword, DIM))
                          for k in keywords]).astype(np.float32)
  labels = [k for k in keywords for _ in range(per_keyword)]
  return codes, labels


def test_build_and_condition():
  codes, labels = _labelled_codes()
  book = build_codebook(codes, labels, {"dataset": "toy"})
  assert book.keywords == EMOTIONS and book.latents.shape == (8, DIM)
  assert book.counts.tolist() == [5] * 8
  happy = codes[np.asarray(labels) == "happy"].mean(0)
  neutral = codes[np.asarray(labels) == "neutral"].mean(0)
  np.testing.assert_allclose(book.condition("happy", 0.0), neutral, atol=1e-6)
  np.testing.assert_allclose(book.condition("happy"), happy, atol=1e-6)
  np.testing.assert_allclose(book.condition("Happiness", 1.5), neutral + 1.5 * (happy - neutral),
                             atol=1e-5)
  assert book.condition("sad", 0.5).dtype == np.float32
  for bad in (2.0, -0.1, float("nan"), "lots"):
    with pytest.raises(ValueError, match="intensity"):
      book.condition("happy", bad)
  with pytest.raises(ValueError, match="unknown emotion"):
    book.condition("contempt")


def test_blends_mix_keywords_by_normalised_weights():
  assert parse_emotion(" Happy ") == (("happy", 1.0),)
  assert parse_emotion("happy:0.7, surprise:0.3") == (("happy", 0.7), ("surprised", 0.3))
  assert parse_emotion("happy:2,sad:2") == (("happy", 0.5), ("sad", 0.5))
  assert emotion_name(parse_emotion("happy:0.7,surprised:0.3")) == "happy:0.70,surprised:0.30"
  assert emotion_name(parse_emotion("joy")) == "happy"
  for bad, message in (("happy:0.7,sad", "no weight"), ("happy:-1,sad:1", ">= 0"),
                       ("happy:x,sad:1", ">= 0"), ("happy:0,sad:0", "all zero"),
                       ("happy:1,joy:1", "twice"), ("happy:1,elated:1", "unknown emotion")):
    with pytest.raises(ValueError, match=message):
      parse_emotion(bad)
  codes, labels = _labelled_codes()
  book = build_codebook(codes, labels, {"dataset": "toy"})
  happy, surprised, neutral = (book.latent(k) for k in ("happy", "surprised", "neutral"))
  mix = 0.7 * happy + 0.3 * surprised
  np.testing.assert_allclose(book.condition("happy:0.7,surprised:0.3"), mix, atol=1e-5)
  np.testing.assert_allclose(book.condition("happy:7,surprised:3", 0.5),
                             neutral + 0.5 * (mix - neutral), atol=1e-5)
  np.testing.assert_allclose(book.condition("happy:1,sad:0"), happy, atol=1e-6)


def test_build_requires_every_keyword_unless_allowed():
  codes, labels = _labelled_codes(("happy", "sad", "neutral"))
  with pytest.raises(ValueError, match="angry.*worried"):
    build_codebook(codes, labels)
  book = build_codebook(codes, labels, allow_missing=True)
  assert book.keywords == ("happy", "sad", "neutral")
  with pytest.raises(ValueError, match="no latent for 'angry'.*happy, sad, neutral"):
    book.condition("angry")
  codes, labels = _labelled_codes(("happy", "sad"))
  with pytest.raises(ValueError, match="neutral"):
    build_codebook(codes, labels, allow_missing=True)


def test_nearest():
  codes, labels = _labelled_codes()
  book = build_codebook(codes, labels)
  keywords, indices = book.nearest(codes.reshape(8, 5, DIM))
  assert keywords.shape == (8, 5) and (keywords == np.asarray(labels).reshape(8, 5)).all()
  assert (np.asarray(book.keywords)[indices] == keywords).all()
  keyword, _ = book.nearest(book.condition("angry"))
  assert keyword == "angry"
  with pytest.raises(ValueError, match="do not match"):
    book.nearest(np.zeros((3, DIM + 1)))


def test_save_load_round_trip_and_atomic_write(tmp_path, monkeypatch):
  codes, labels = _labelled_codes()
  book = build_codebook(codes, labels, {"dataset": "toy"})
  path = book.save(tmp_path / "books" / "codebook.json")
  loaded = Codebook.load(path)
  assert loaded.keywords == book.keywords and loaded.source == {"dataset": "toy"}
  np.testing.assert_array_equal(loaded.latents, book.latents)  # float32 exact through JSON
  np.testing.assert_array_equal(loaded.counts, book.counts)

  before = path.read_text()
  def failing_replace(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(records_module.os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    build_codebook(*_labelled_codes(seed=1)).save(path)
  monkeypatch.undo()
  assert path.read_text() == before and os.listdir(path.parent) == ["codebook.json"]


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="etalk codebook build"):
    Codebook.load(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    Codebook.load(bad)
  bad.write_text(json.dumps({"hello": 1}))
  with pytest.raises(ValueError, match="not an emotion codebook"):
    Codebook.load(bad)
  data = build_codebook(*_labelled_codes()).to_dict()
  data["latents"] = data["latents"][:3]
  bad.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="latents have shape"):
    Codebook.load(bad)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  return synthetic_talking_heads.build(str(tmp_path_factory.mktemp("synthetic")), "tiny")


def test_codebook_build_command(tiny_dataset, tmp_path, monkeypatch, caplog):
  # Relabel the first clip as MEAD's "contempt": it must be skipped and counted.
  real_source = loader.data_source

  class Relabelled:
    def __init__(self, records):
      self.records, self.dataset_info = records, records.dataset_info

    def __len__(self):
      return len(self.records)

    def __getitem__(self, index):
      record = dict(self.records[index])
      if index == 0:
        record["emotion"] = self.dataset_info.features["emotion"].names.index("contempt")
      return record

  monkeypatch.setattr(loader, "data_source", lambda *args: Relabelled(real_source(*args)))
  encoders = _random_model(lambda rngs: AdaptedPDFGC(PDFGC_SMALL, rngs=rngs))
  dst = tmp_path / "codebook.json"
  with caplog.at_level("WARNING"):
    summary = codebook_build_command(tiny_dataset, dst, encoders=encoders,
                                     max_frames_per_clip=6, progress=False)
  assert summary["skipped"] == {"contempt": 1} and summary["clips"] == 6
  assert set(summary["frames"]) == {"neutral", "happy", "sad", "angry"}
  assert sum(summary["frames"].values()) == 6 * 6
  assert summary["missing"] == ["surprised", "fearful", "disgusted", "worried"]
  assert "surprised" in caplog.text
  book = Codebook.load(dst)
  assert book.keywords == ("happy", "angry", "sad", "neutral")
  assert book.dim == PDFGC_SMALL.expression_dim and np.isfinite(book.latents).all()
  assert book.source["split"] == "train"
  with pytest.raises(ValueError, match="no latent for 'fearful'"):
    book.condition("fearful")
  with pytest.raises(FileExistsError, match="--overwrite"):
    codebook_build_command(tiny_dataset, dst, encoders=encoders, progress=False)
  with pytest.raises(ValueError, match="--encoders"):
    codebook_build_command(tiny_dataset, tmp_path / "other.json", progress=False)


# --------------------------------------------------------------------------------------------
# Speech-emotion head
# --------------------------------------------------------------------------------------------

CONFIG = ser.SER_TINY


def _toy_batch(rng, count, frames=12):
  """Random "states" whose mean over time and layers depends on the class."""
  centres = np.random.default_rng(123).normal(size=(len(EMOTIONS), CONFIG.hidden_size))
  labels = rng.integers(0, len(EMOTIONS), count)
  states = rng.normal(size=(count, frames, CONFIG.num_layers, CONFIG.hidden_size))
  states += 0.8 * centres[labels][:, None, None, :]
  lengths = rng.integers(frames // 2, frames + 1, count)
  mask = np.arange(frames)[None] < lengths[:, None]
  return states.astype(np.float32), mask, labels.astype(np.int32)


def test_head_shapes_and_masking():
  head = ser.SpeechEmotionHead(CONFIG, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(head.layer_weights(), 1 / CONFIG.num_layers)
  states, mask, _ = _toy_batch(np.random.default_rng(0), 4)
  logits = head(states, mask)
  assert logits.shape == (4, len(EMOTIONS))
  # Padding frames (anything, NaN included) and extra padding never change the logits.
  garbage = np.where(mask[..., None, None], states, np.nan)
  longer_states = np.concatenate([garbage, np.full_like(garbage[:, :5], 7.0)], axis=1)
  longer_mask = np.concatenate([mask, np.zeros_like(mask[:, :5])], axis=1)
  np.testing.assert_allclose(head(longer_states, longer_mask), logits, atol=1e-5)
  keywords, probabilities = ser.predict_keyword(head, states, mask)
  assert len(keywords) == 4 and set(keywords) <= set(EMOTIONS)
  np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-5)
  # Dropout only with a key.
  assert not np.allclose(head(states, mask, dropout_key=jax.random.key(1)), logits)
  with pytest.raises(ValueError, match="SERConfig.for_audio"):
    head(states[..., :-1], mask)
  with pytest.raises(ValueError, match="num_classes"):
    ser.SERConfig(num_classes=7)


def test_head_learns_a_separable_problem():
  rng = np.random.default_rng(0)
  train, test = _toy_batch(rng, 256), _toy_batch(rng, 128)
  head = ser.SpeechEmotionHead(CONFIG, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(head, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(head, optimizer, states, mask, labels, key):
    def loss_fn(head):
      return ser.ser_loss(head, states, mask, labels, dropout_key=key)
    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(head)
    optimizer.update(head, grads)
    return loss, accuracy

  keys = jax.random.split(jax.random.key(0), 300)
  for key in keys:
    step(head, optimizer, *train, key)
  _, accuracy = ser.ser_loss(head, *test)
  assert float(accuracy) > 0.9


TINY_WAVLM = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=32, conv_dim=(16, 16, 16), conv_stride=(5, 2, 2),
                  conv_kernel=(10, 3, 2), num_conv_pos_embeddings=8,
                  num_conv_pos_embedding_groups=4, num_buckets=16, max_bucket_distance=40)


def test_speech_states_and_keyword_from_speech(tmp_path):
  audio = AudioFeatures(_random_model(lambda rngs: WavLM(WavLMConfig(**TINY_WAVLM), rngs=rngs)),
                        FeatureConfig(chunk_frames=50, context_frames=10, bucket_frames=(50,)))
  samples = np.random.default_rng(0).normal(size=16_000).astype(np.float32) * 0.1
  states = ser.speech_states(audio, samples)
  assert states.shape == (25, 3, 16)
  np.testing.assert_allclose(ser.speech_states(audio, (samples[None].repeat(2, 0), 16_000)),
                             states, atol=1e-5)  # stereo (channels, samples) is downmixed
  head = ser.SpeechEmotionHead(ser.SERConfig.for_audio(audio, head_dim=8), rngs=nnx.Rngs(0))
  keyword, probabilities = ser.keyword_from_speech(head, audio, samples)
  assert keyword in EMOTIONS and list(probabilities) == list(EMOTIONS)
  wrong = ser.SpeechEmotionHead(dataclasses.replace(CONFIG, hidden_size=8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use the WavLM"):
    ser.keyword_from_speech(wrong, audio, samples)


def test_save_load_round_trip(tmp_path):
  head = ser.SpeechEmotionHead(CONFIG, rngs=nnx.Rngs(3))
  states, mask, _ = _toy_batch(np.random.default_rng(0), 3)
  folder = ser.save_ser(head, tmp_path / "ser")
  loaded = ser.load_ser(folder)
  assert loaded.config == CONFIG
  np.testing.assert_array_equal(loaded(states, mask), head(states, mask))
  with pytest.raises(FileExistsError):
    ser.save_ser(head, folder)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "pdfgc"}))
  with pytest.raises(ValueError, match="does not hold a speech-emotion head"):
    ser.load_ser(tmp_path / "other")
