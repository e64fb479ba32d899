"""Multi-source emotion control (docs/ARCHITECTURE.md §3.10): text or emotional speech -> one of
the eight keywords (`data_pipeline.EMOTIONS`) -> the codebook's expression latent, scaled from
neutral by an intensity, as Di-CTE's emotion condition `e_cond`.

  keywords.py  text -> keyword offline (lexicon with synonyms and negation; a pluggable
               classifier hook), `check_keyword` for user-given keywords
  codebook.py  one expression latent per keyword from labelled frames (`etalk codebook build`),
               `condition(keyword, intensity)`, `nearest` to read emotion back from faces
  ser.py       the speech-emotion head on frozen WavLM hidden states (its own training stage)

The speech-emotion head (ser.py) imports JAX; import it from `etalk_jax.emotion.ser`.
"""

from etalk_jax.emotion.codebook import Codebook, build_codebook, codebook_build_command
from etalk_jax.emotion.keywords import (
  KEYWORD_ALIASES,
  LEXICON,
  NEGATED,
  check_keyword,
  keyword_from_text,
)

__all__ = [
    "KEYWORD_ALIASES", "LEXICON", "NEGATED", "Codebook", "build_codebook", "check_keyword",
    "codebook_build_command", "keyword_from_text",
]
