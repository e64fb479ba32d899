"""`etalk app`: a web page over `EmotiveTalkPipeline` (Gradio, the `app` extra).

  etalk app [--checkpoint DIR] [--host 127.0.0.1] [--port 7860]

A portrait, speech (a file or the microphone), one of the five emotion sources (a keyword with
its intensity, a sentence, a face photo, a driving video, emotional speech), the sampler's steps
and seed; the video comes back with its audio. The checkpoint loads once, when the server
starts (the demo's `demo_out/checkpoint` by default). Bad input shows the same message as
`etalk sample`, in the page; anything else is a bug and keeps its traceback in the server's log.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from data_pipeline import EMOTIONS
from etalk_jax.emotion.keywords import parse_emotion
from etalk_jax.errors import InputNotFound, MissingDependency, UserError
from etalk_jax.pipeline.checkpoint import read_pipeline_record
from etalk_jax.pipeline.core import EmotiveTalkPipeline, check_sampling_arguments

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "demo_out/checkpoint"
# The emotion sources, as the page names them, -> the pipeline's argument.
SOURCES = {"none (the portrait's own expression)": None, "keyword": "emotion",
           "text": "emotion_text", "face photo": "emotion_image",
           "driving video": "emotion_video", "emotional speech": "emotion_audio"}


def _gradio():
  # No usage analytics leave a user's machine unless they ask for it.
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio  # noqa: PLC0415 (optional, the `app` extra: only the web page needs it)
  except ImportError:
    raise MissingDependency("the web page needs Gradio: pip install 'etalk-jax[app]'") from None
  return gradio


def emotion_arguments(source: str, keyword: str | None, text: str | None, image: str | None,
                      video: str | None, speech: str | None) -> dict[str, Any]:
  """The page's emotion fields -> the pipeline's keyword arguments (one source at most); a
  source chosen without its input is a user error naming the field."""
  argument = SOURCES.get(source)
  if source not in SOURCES:
    raise UserError(f"emotion source {source!r}: choose one of {', '.join(SOURCES)}")
  if argument is None:
    return {}
  value = {"emotion": keyword, "emotion_text": text, "emotion_image": image,
           "emotion_video": video, "emotion_audio": speech}[argument]
  if value is None or (isinstance(value, str) and not value.strip()):
    raise UserError(f"the emotion source is {source!r}, but no {source} was given; give one or "
                    "choose another source.")
  if argument == "emotion":
    parse_emotion(value)
  return {argument: value}


class Generator:
  """The loaded pipeline and one call per request (requests run one at a time: the queue)."""

  def __init__(self, checkpoint: str | Path):
    self.checkpoint = Path(checkpoint)
    self.record = read_pipeline_record(self.checkpoint)  # a clear error before the slow load
    self.pipeline = EmotiveTalkPipeline.load(self.checkpoint)
    self.outputs = Path(tempfile.mkdtemp(prefix="etalk-app-"))
    self.count = 0

  def __call__(self, portrait: str | None, speech: str | None, source: str,
               keyword: str | None, text: str | None, image: str | None, video: str | None,
               emotional_speech: str | None, intensity: float, steps: float | None,
               seed: float | None) -> str:
    """The page's fields -> the path of the generated mp4."""
    if portrait is None:
      raise UserError("no portrait: upload a photo of one face.")
    if speech is None:
      raise UserError("no speech: upload a speech file or record with the microphone.")
    emotion = emotion_arguments(source, keyword, text, image, video, emotional_speech)
    steps = None if steps in (None, 0) else int(steps)
    check_sampling_arguments(intensity, steps, None)
    for label, path in (("portrait", portrait), ("speech", speech)):
      if not Path(path).is_file():
        raise InputNotFound(f"the {label} upload {path} is gone; upload it again.")
    result = self.pipeline(portrait, speech, intensity=intensity, steps=steps,
                           seed=int(seed or 0), progress=True, **emotion)
    self.count += 1
    return str(result.write(self.outputs / f"etalk_{self.count:04d}.mp4"))


def build_app(generator: Generator):
  """The Gradio page (Blocks) over `generator`."""
  gr = _gradio()

  def generate(*fields, progress=gr.Progress(track_tqdm=True)):  # Gradio's progress idiom
    try:
      return generator(*fields)
    except UserError as error:  # shown in the page, as the CLI shows it
      raise gr.Error(str(error)) from None

  resolution = generator.record["resolution"]
  with gr.Blocks(title="EmotiveTalk (etalk-jax)") as page:
    gr.Markdown(f"# EmotiveTalk\nA portrait and speech in, a talking-head video out. "
                f"Checkpoint `{generator.checkpoint}` ({resolution}x{resolution}).")
    with gr.Row():
      with gr.Column():
        portrait = gr.Image(label="portrait (one face)", type="filepath",
                            elem_id="portrait")
        speech = gr.Audio(label="speech", sources=["upload", "microphone"], type="filepath",
                          elem_id="speech")
        source = gr.Radio(list(SOURCES), value=next(iter(SOURCES)), label="emotion source",
                          elem_id="source")
        # Only the chosen source's input is shown (`show_source` below).
        keyword = gr.Dropdown(list(EMOTIONS), value="happy", allow_custom_value=True,
                              label="keyword (or a blend: happy:0.7,surprised:0.3)",
                              visible=False, elem_id="keyword")
        text = gr.Textbox(label="text (an emotion in words)", visible=False, elem_id="text")
        image = gr.Image(label="face photo showing the emotion", type="filepath",
                         visible=False, elem_id="image")
        video = gr.Video(label="driving video (its expressions drive the face)", visible=False,
                         elem_id="video")
        emotional_speech = gr.Audio(label="emotional speech", type="filepath", visible=False,
                                    elem_id="emotional_speech")
        intensity = gr.Slider(0.0, 1.5, value=1.0, step=0.05,
                              label="intensity (0 neutral, 1 the emotion, up to 1.5)",
                              visible=False, elem_id="intensity")
        with gr.Row():
          steps = gr.Number(value=0, precision=0, label="steps (0: the checkpoint's)")
          seed = gr.Number(value=0, precision=0, label="seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
      with gr.Column():
        result = gr.Video(label="generated video", elem_id="result", autoplay=False)
    sources = [keyword, text, image, video, emotional_speech]

    def show_source(chosen: str):
      argument = SOURCES.get(chosen)
      shown = [gr.update(visible=SOURCES[name] == argument and argument is not None)
               for name in list(SOURCES)[1:]]
      return shown + [gr.update(visible=argument in ("emotion", "emotion_image"))]

    source.change(show_source, inputs=source, outputs=sources + [intensity])
    button.click(generate, inputs=[portrait, speech, source, keyword, text, image, video,
                                   emotional_speech, intensity, steps, seed],
                 outputs=result)
  return page


def app_command(checkpoint: str | None, host: str = "127.0.0.1", port: int = 7860,
                open_browser: bool = False) -> None:
  """`etalk app`: loads the checkpoint and serves the page until interrupted."""
  _gradio()  # the missing extra is reported before the slow load
  checkpoint = checkpoint or DEFAULT_CHECKPOINT
  if not Path(checkpoint).is_dir():
    hint = ("run `make demo` (or `etalk demo`) first, which writes it, or pass --checkpoint DIR"
            if checkpoint == DEFAULT_CHECKPOINT else "give a pipeline checkpoint folder")
    raise InputNotFound(f"--checkpoint {checkpoint} does not exist; {hint}.")
  generator = Generator(checkpoint)
  page = build_app(generator)
  print(f"etalk app: serving {checkpoint} at http://{host}:{port} (Ctrl-C stops)", flush=True)
  page.queue(default_concurrency_limit=1).launch(
      server_name=host, server_port=port, inbrowser=open_browser, share=False,
      allowed_paths=[str(generator.outputs)], show_error=True)
