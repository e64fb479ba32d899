"""`etalk demo --quick`: the training path of the README's main job, end to end at smoke size
(every stage trains a couple of steps, the pipeline checkpoint is written, packed and loads, videos
and the report appear). tests/demo/test_shipped.py: the embedded checkpoint `etalk demo` samples."""

import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline import media, synthetic
from etalk_jax import cli
from etalk_jax.demo import report as demo_report, shipped, stages, wiring
from etalk_jax.pipeline import EmotiveTalkPipeline


# 270 s on a cold compilation cache (stop 29's CI), a fifth of `make test`'s time on 2 cores:
# CI runs it in the slow subset (Makefile's SLOW_SUBSET).
@pytest.mark.slow
def test_quick_demo_trains_every_stage_generates_and_reports(tmp_path, capsys):
  workdir = tmp_path / "demo"
  assert cli.main(["demo", "--quick", "--workdir", str(workdir), "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "lip sync" in out and "no audio" in out and "std over the videos" in out
  for stage in ("encoders", "projector", "dicte", "ethd", "ser"):
    assert (workdir / "runs" / stage / "export").is_dir(), stage
    assert (workdir / "runs" / stage / "metrics.jsonl").is_file(), stage
  report = json.loads((workdir / "report.json").read_text())
  kinds = ("generated", "ground truth", "no-audio baseline")
  assert set(report) == {*kinds, "videos", "sampling", "phases_seconds", "total_seconds",
                         "mouth_reader_fit_correlation", "emotion_reader_fit_accuracy",
                         "checkpoint"}
  assert report["checkpoint"]["trained"] == "etalk demo --quick"
  # Two held-out identities x the two emotions: four videos, each scored for every kind.
  assert len({video["speaker"] for video in report["videos"]}) == 2
  assert sorted(video["emotion"] for video in report["videos"]) == ["angry"] * 2 + ["sad"] * 2
  for kind in kinds:
    for score in ("lip_sync", "emotion"):
      per_video = [video[kind][score] for video in report["videos"]]
      assert np.all(np.isfinite(per_video)), (kind, score)
      # The headline score is the mean over the videos, with their spread beside it.
      assert np.isclose(report[kind][score], np.mean(per_video)), (kind, score)
      assert np.isclose(report[kind][f"{score}_std"], np.std(per_video)), (kind, score)
    assert 0 <= report[kind]["emotion"] <= 1, kind  # an accuracy
  for stage in ("encoders", "projector", "dicte", "ethd", "ser"):
    last = json.loads((workdir / "runs" / stage / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["loss"]), stage
  # The ground truth's mouth really follows its speech: the reader and the envelope work.
  assert report["ground truth"]["lip_sync"] > 0.3
  assert report["sampling"]["frames_per_second"] > 0
  videos = sorted(p.name for p in (workdir / "videos").glob("*.mp4"))
  assert videos == sorted(f"{v['speaker']}_{v['emotion']}{suffix}.mp4" for v in report["videos"]
                          for suffix in ("", "_no_audio", "_ground_truth"))
  # The frame strip: generated, no audio and ground truth, 8 frames of 64 px enlarged twice.
  assert Image.open(workdir / "frames.png").size == (110 + 8 * 128, 3 * 128)
  assert "try it in the browser: etalk app --checkpoint" in out
  first = report["videos"][0]
  info = media.probe(workdir / "videos" / f"{first['speaker']}_{first['emotion']}.mp4")
  assert info.width == info.height == 64
  assert EmotiveTalkPipeline.load(workdir / "checkpoint").resolution == 64
  # The trained checkpoint packed as the embedded one is, with its provenance (digests checked).
  config = wiring.demo_config(quick=True)
  provenance = shipped.read_provenance(workdir / shipped.PACKED)
  assert provenance["command"] == "etalk demo --quick"
  assert provenance["config"] == json.loads(config.to_json())
  assert provenance["seeds"] == wiring.demo_seeds(config)
  assert provenance["report"]["generated"] == report["generated"]
  assert provenance["training_seconds"] == report["checkpoint"]["training_seconds"]
  unpacked = shipped.unpack(workdir / shipped.PACKED, tmp_path / "unpacked")
  assert EmotiveTalkPipeline.load(unpacked).resolution == 64


def test_mouth_reader_reads_emotional_mouths_in_the_portraits_box():
  """Fitted as it is used (the portrait's mouth box) on colour and the difference to the
  portrait, the reader follows a held-out face's mouth in every emotion. Grey pixels in each
  clip's own box read this face's sad and angry mouths inverted (it shows teeth, not a dark
  cavity): correlation -0.86 and -0.49 with the true opening."""
  def clips_of(identity_index, emotions):
    identity = synthetic.make_identity(identity_index)
    made = {emotion: synthetic.make_clip(identity, emotion, 3, 60, 64, head_motion_scale=0.3)
            for emotion in emotions}
    return {emotion: demo_report.HeldOutClip(
        clip_id=clip.clip_id, emotion=emotion, frames=clip.frames,
        speech=clip.audio.astype(np.float32), landmarks_px=clip.landmarks * 64,
        mouth_open=clip.mouth_open) for emotion, clip in made.items()}

  emotions = ("neutral", "sad", "surprised", "angry")
  training = []
  for index in range(3):
    clips = clips_of(index, emotions)
    portrait = clips["neutral"]
    training += [(clip, portrait.frames[0], portrait.landmarks_px[0]) for clip in clips.values()]
  reader = demo_report.MouthReader(training)
  held_out = clips_of(6, emotions)
  portrait = held_out["neutral"]
  for emotion in emotions:
    clip = held_out[emotion]
    read = reader(clip.frames, portrait.frames[0], portrait.landmarks_px[0])
    assert np.corrcoef(read, clip.mouth_open)[0, 1] > 0.8, emotion


def test_the_stage_graph_runs_each_step_after_what_it_needs():
  """Every step needs only earlier steps (the scheduler walks the graph in its order), and the
  demo trains every stage of `train.stages.STAGES` but the joint V-AID one, in that order."""
  names = [step.name for step in stages.STEPS]
  for index, step in enumerate(stages.STEPS):
    assert set(step.needs) <= set(names[:index]), step.name
  assert stages.TRAINED_STAGES == ("encoders", "projector", "dicte", "ethd", "ser")
  assert set(stages.TRAINED_STAGES) <= set(names) and set(stages.CONFIG_FILES) == set(
      stages.TRAINED_STAGES)
  ethd = next(step for step in stages.STEPS if step.name == "ethd")
  assert "projector" in ethd.needs  # ETHD reads its export
  # ... and no Di-CTE (wiring trains it on ground-truth expressions), so Di-CTE trains beside it.
  assert "dicte" not in ethd.needs


def test_an_interrupted_stage_stops_the_demo_with_the_resume_advice(tmp_path, monkeypatch, capsys):
  """SIGTERM during a stage's training: `train` saves and returns `stopped_at`; the demo stops
  there (not with a later, misleading error) and says how to resume."""
  monkeypatch.setattr(wiring, "train", lambda config, folder, progress: {
      "stopped_at": 3, "final_metrics": {}, "steps": 10, "compile_seconds": 0.0})
  with pytest.raises(wiring.DemoInterrupted, match="stage ethd stopped at step 3"):
    wiring.train_stage(tmp_path, "ethd", None, progress=False)

  def interrupted(*args):
    raise wiring.DemoInterrupted("stage ethd stopped at step 3, saved")

  monkeypatch.setattr(wiring, "run_steps", interrupted)
  assert cli.main(["demo", "--quick", "--workdir", str(tmp_path / "demo"), "--no-progress"]) == 130
  assert "interrupted (stage ethd stopped at step 3, saved); run the same command to resume" in (
      capsys.readouterr().out)


def test_a_workdir_of_another_configuration_is_refused(tmp_path, capsys):
  """A workdir records the configuration it was made with; one made with another (or by a
  version before the record) is refused before anything runs: its finished stages would be
  reused as they are."""
  config = wiring.demo_config(quick=True)
  same = tmp_path / "same"
  same.mkdir()
  wiring.check_workdir(same, config)
  wiring.check_workdir(same, config)  # the same configuration: reused
  assert (same / wiring.CONFIG_RECORD).is_file()
  other = tmp_path / "other"
  other.mkdir()
  (other / wiring.CONFIG_RECORD).write_text(json.dumps({"steps": {"ethd": 1}}))
  older = tmp_path / "older"
  (older / "runs").mkdir(parents=True)
  for workdir, why in ((other, "another demo configuration"),
                       (older, "an earlier version of `etalk demo`")):
    assert cli.main(["demo", "--quick", "--workdir", str(workdir), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert why in error and "Remove the folder, or give another --workdir" in error
    assert not (workdir / "data").exists()
