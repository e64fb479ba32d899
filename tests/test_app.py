"""`etalk app`: the page's argument handling, and the whole page in a real browser (headless
Chromium from the system packages, driven by Selenium through chromedriver): `etalk app` serves a
tiny random checkpoint; the browser clicks Generate with nothing uploaded and reads the error,
then uploads a portrait (the astronaut photo: a real face) and a wav, picks a keyword, generates,
waits for a playable video and saves a screenshot."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from data_pipeline import media
from data_pipeline.synthetic import make_identity
from data_pipeline.synthetic.speech import synthesize_speech
from etalk_jax import app, cli
from etalk_jax.errors import UserError
from etalk_jax.pipeline import save_pipeline
from tests.pipeline.test_pipeline import tiny_components

ROOT = Path(__file__).parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_emotion_fields_become_one_pipeline_argument():
  assert app.emotion_arguments("none (the portrait's own expression)", "happy", "x", None, None,
                               None) == {}
  assert app.emotion_arguments("keyword", "sad", None, None, None, None) == {"emotion": "sad"}
  assert app.emotion_arguments("text", None, "quite cheerful", None, None, None) == {
      "emotion_text": "quite cheerful"}
  assert app.emotion_arguments("face photo", None, None, "face.png", None, None) == {
      "emotion_image": "face.png"}
  with pytest.raises(UserError, match="no text was given"):
    app.emotion_arguments("text", None, "  ", None, None, None)
  with pytest.raises(UserError, match="joyful"):  # check_keyword's message
    app.emotion_arguments("keyword", "joyful", None, None, None, None)
  with pytest.raises(UserError, match="choose one of"):
    app.emotion_arguments("telepathy", None, None, None, None, None)


def test_app_command_errors(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no demo_out/checkpoint here
  assert cli.main(["app"]) == 2
  assert "make demo" in capsys.readouterr().err
  assert cli.main(["app", "--checkpoint", str(tmp_path / "nothing")]) == 2
  assert "does not exist" in capsys.readouterr().err


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture
def served(tmp_path):
  """`etalk app` on a tiny random checkpoint, in its own process; yields its URL."""
  checkpoint = save_pipeline(tmp_path / "checkpoint", **tiny_components())
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, "-m", "etalk_jax.cli", "app", "--checkpoint", str(checkpoint), "--port",
       str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  try:
    deadline = time.monotonic() + 300
    for line in server.stdout:  # "etalk app: serving ..." comes once the checkpoint is loaded
      if "Running on local URL" in line:
        break
      assert time.monotonic() < deadline, "etalk app did not start"
    else:
      pytest.fail(f"etalk app exited with {server.wait()}")
    yield f"http://127.0.0.1:{port}/"
  finally:
    server.terminate()
    server.wait(timeout=30)


def _browser():
  from selenium import webdriver  # noqa: PLC0415 (test-only, and only this test needs it)
  from selenium.webdriver.chrome.service import Service  # noqa: PLC0415 (as above)
  options = webdriver.ChromeOptions()
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                   "--window-size=1280,1600"):
    options.add_argument(argument)
  options.binary_location = CHROMIUM
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(condition, seconds: float, what: str):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    time.sleep(0.5)
  pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs chromium and chromedriver (.ci/run installs them)")
def test_page_generates_a_playable_video_in_a_real_browser(served, tmp_path):
  from selenium.webdriver.common.by import By  # noqa: PLC0415 (test-only, as _browser)
  portrait, speech = tmp_path / "portrait.png", tmp_path / "speech.wav"
  Image.fromarray(skimage_data.astronaut()).save(portrait)
  audio, _, _ = synthesize_speech(np.random.default_rng(0), 25, make_identity(0), "neutral", 1.0)
  media.write_audio_file(speech, audio)

  driver = _browser()
  try:
    driver.get(served)
    errors = lambda: [e.text for e in driver.find_elements(  # noqa: E731
        By.CSS_SELECTOR, "[data-testid=toast-body].error [data-testid=toast-text]")]
    button = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#generate"), 60, "the page")[0]
    # Bad input: the same message as the command line, in the page.
    button.click()
    assert "no portrait" in _wait(lambda: " ".join(errors()), 60, "the error message")
    driver.refresh()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#generate"), 60, "the page")
    driver.find_element(By.CSS_SELECTOR, "#portrait input[type=file]").send_keys(str(portrait))
    driver.find_element(By.CSS_SELECTOR, "#speech input[type=file]").send_keys(str(speech))
    keyword = [label for label in driver.find_elements(By.CSS_SELECTOR, "#source label")
               if label.text.strip() == "keyword"]
    keyword[0].click()
    _wait(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, "#keyword")
                   if e.is_displayed()], 30, "the keyword field")
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#speech audio, #speech .waveform, "
                                                        "#speech [data-testid=waveform]"), 60,
          "the uploaded speech")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()

    def playable():
      assert not errors(), errors()
      videos = driver.find_elements(By.CSS_SELECTOR, "#result video")
      if not videos or not videos[0].get_attribute("src"):
        return None
      state = driver.execute_script(
          "const v = arguments[0]; return [v.readyState, v.duration];", videos[0])
      return state if state[0] >= 1 and state[1] > 0 else None

    ready_state, duration = _wait(playable, 240, "a playable video")
    assert duration == pytest.approx(1.0, abs=0.2)  # 25 frames of speech at 25 fps
    driver.save_screenshot(str(tmp_path / "etalk_app.png"))
    assert (tmp_path / "etalk_app.png").stat().st_size > 0
  finally:
    driver.quit()
