"""The demo's stage graph as data: each step of `etalk demo`'s training part, what it needs done
before it, and whether it runs in the side process beside the main process's steps.

Two processes keep both CPU cores busy (one process keeps ~1.2 of two busy: the demo's user time
over its wall time): the side process builds the frozen speech encoders and the renderer's
initialisation while the main one builds the dataset, fits the report's readers while the main
one pretrains the PD-FGC stand-in, trains the speech-emotion head beside the encoder stage, and
Di-CTE and the emotion codebook beside the projector and ETHD. `schedule.run_steps` runs the
graph; `wiring.py` says what each step does.
"""

from __future__ import annotations

import dataclasses

from etalk_jax.train.stages import STAGES

# The training stages the demo runs, in dependency order: every stage but the joint V-AID one
# (the demo trains the projector and Di-CTE apart).
TRAINED_STAGES = tuple(stage for stage in STAGES if stage != "vaid")
# The shipped config each trained stage starts from (`configs/<file>.py:tiny`, then the demo's
# sizes, steps and folders: `wiring.stage_configs`).
CONFIG_FILES = {"encoders": "encoders", "projector": "vaid", "dicte": "dicte", "ethd": "ethd_512",
                "ser": "ser"}


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of the graph. `title` names its phase in the printout and in the report's
  `phases_seconds` (None: the step is not timed as a phase); `needs` are the steps whose results
  it reads; `beside`: it runs in the side process (one worker, first come first served)."""
  name: str
  title: str | None
  needs: tuple[str, ...] = ()
  beside: bool = False


STEPS = (
    Step("frozen", "frozen encoders (random tiny wav2vec2 and WavLM) and the initial renderer",
         beside=True),
    Step("dataset", "synthetic dataset"),
    Step("readers", "mouth and emotion readers, fitted on training identities,",
         needs=("dataset",), beside=True),
    # The stand-in for PD-FGC's pretrained weights (`pdfgc_standin`), frozen from then on.
    Step("pdfgc", "pretrain the PD-FGC stand-in on the training frames", needs=("dataset",)),
    # Fits the latent codec on the dataset.
    Step("configs", None, needs=("dataset", "frozen", "pdfgc")),
    Step("ser", "train ser", needs=("configs",), beside=True),
    Step("encoders", "train encoders", needs=("configs",)),
    Step("precompute", "precompute the trained encoders' outputs", needs=("configs", "encoders")),
    Step("dicte", "train dicte", needs=("configs", "precompute"), beside=True),
    Step("projector", "train projector", needs=("configs", "precompute")),
    Step("codebook", "emotion codebook", needs=("dataset", "encoders"), beside=True),
    # ETHD reads no Di-CTE (it trains on ground-truth expressions: configs/tiny.py).
    Step("ethd", "train ethd", needs=("configs", "precompute", "projector")),
)
