"""`etalk demo --quick`: the README's main job, end to end at smoke size (every stage trains a
couple of steps, the pipeline checkpoint is written and loads, videos and the report appear)."""

import json

import numpy as np


def test_quick_demo_trains_every_stage_generates_and_reports(tmp_path, capsys):
  from data_pipeline import media
  from etalk_jax import cli
  from etalk_jax.pipeline import EmotiveTalkPipeline

  workdir = tmp_path / "demo"
  assert cli.main(["demo", "--quick", "--workdir", str(workdir), "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "lip-sync" in out and "no-audio baseline" in out
  for stage in ("encoders", "projector", "dicte", "ethd", "ser"):
    assert (workdir / "runs" / stage / "export").is_dir(), stage
    assert (workdir / "runs" / stage / "metrics.jsonl").is_file(), stage
  report = json.loads((workdir / "report.json").read_text())
  for kind in ("generated", "ground truth", "no-audio baseline"):
    for score in ("lip_sync", "emotion"):
      assert np.isfinite(report[kind][score]), (kind, score)
  # The ground truth's mouth really follows its speech: the reader and the envelope work.
  assert report["ground truth"]["lip_sync"] > 0.3
  assert report["sampling"]["frames_per_second"] > 0
  videos = sorted(p.name for p in (workdir / "videos").glob("*.mp4"))
  assert videos == sorted(f"{e}{s}.mp4" for e in ("sad", "angry")
                          for s in ("", "_no_audio", "_ground_truth"))
  info = media.probe(workdir / "videos" / "sad.mp4")
  assert info.width == info.height == 64
  assert EmotiveTalkPipeline.load(workdir / "checkpoint").resolution == 64
