"""Text -> one of the paper's eight emotion keywords, offline (docs/ARCHITECTURE.md §3.10).

EmotiveTalk's emotion codebook holds one expression latent per keyword
(`data_pipeline.EMOTIONS`). A user may describe the emotion in words ("she is furious", "not
happy at all"); `keyword_from_text` maps such a description to a keyword with a small lexicon,
so generation never needs a network or a language model:

- the text is lower-cased and cut into words (apostrophes kept: "isn't" is one word) and clause
  marks (. , ; : ! ? and "but", "however", "although", "though");
- every word found in `LEXICON` (synonyms and word forms of each keyword: "furious", "joyful",
  "scared", "anxiously", ...) is one vote for its keyword;
- negation: when an odd number of negators (`NEGATORS`: not, no, never, without, hardly, any
  "...n't" word, ...) stands among the 3 words before an emotion word, inside its clause, the
  vote goes to `NEGATED[keyword]` instead ("I am not happy" -> sad, "no fear" -> neutral);
- the keyword with the most votes wins; on a tie, the one voted for last wins (in "a bit sad,
  then happy" the later word is usually the point);
- no emotion word at all -> `ValueError` naming the text and the eight keywords.

A lexicon is a guess; where a better text classifier is at hand, plug it in through the
`classifier` hook: any callable `text -> str | Mapping[str, float]`, returning a keyword (or a
label `check_keyword` accepts, such as "joy" or "anger") or scores per label (the highest wins).
For example, a local transformers text-classification model (transformers is not needed here;
the caller imports it):

    from transformers import pipeline
    emotion_model = pipeline("text-classification", model="/models/emotion-english")

    def classify(text):
      return {entry["label"]: entry["score"] for entry in emotion_model(text, top_k=None)}

    keyword = keyword_from_text("what a lovely day", classifier=classify)

A label outside the eight keywords and `KEYWORD_ALIASES` raises `ValueError` naming it; map such
labels in the wrapper (e.g. drop "love" or send it to "happy").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

from data_pipeline import EMOTIONS
from etalk_jax.errors import UserError

TextClassifier = Callable[[str], "str | Mapping[str, float]"]

# Other names of the keywords themselves (nouns, and the labels common emotion classifiers use),
# accepted wherever a keyword is asked for (`check_keyword`, a classifier's labels, --emotion).
KEYWORD_ALIASES = {
    "happiness": "happy", "joy": "happy",
    "anger": "angry",
    "sadness": "sad", "sorrow": "sad",
    "surprise": "surprised",
    "fear": "fearful", "afraid": "fearful", "scared": "fearful",
    "disgust": "disgusted",
    "worry": "worried", "anxious": "worried",
    "calm": "neutral", "none": "neutral",
}

# Word forms that vote for each keyword. Single words only (text is matched word by word).
LEXICON: dict[str, frozenset[str]] = {
    "happy": frozenset("""
        happy happier happiest happily happiness joy joys joyful joyfully joyous glad gladly
        cheerful cheerfully cheery delighted delight delightful smiling smile smiles smiled grin
        grins grinning pleased contented elated excited excitement thrilled ecstatic
        overjoyed jolly merry laughing laugh laughs laughed euphoric blissful bliss upbeat
        """.split()),
    "angry": frozenset("""
        angry angrier angriest angrily anger angered furious furiously fury mad annoyed annoyance
        irritated irritation irritable rage rages raging enraged outraged outrage livid irate
        frustrated frustration hostile resentful fuming seething indignant grumpy wrath
        """.split()),
    "sad": frozenset("""
        sad sadder saddest sadly sadness unhappy unhappily unhappiness sorrow sorrowful depressed
        depression crying cry cries cried tears tearful weeping weep weeps grief grieving grieve
        mourning mournful miserable misery gloomy gloom melancholy heartbroken downcast dejected
        despair despondent upset lonely
        """.split()),
    "surprised": frozenset("""
        surprised surprise surprises surprising surprisingly astonished astonishment astonishing
        shocked shock shocking amazed amazement stunned startled astounded flabbergasted wow
        """.split()),
    "fearful": frozenset("""
        fearful fearfully fear fears feared afraid scared scary frightened fright frightening
        terrified terror terrifying horrified horror panic panicked panicking petrified alarmed
        dread spooked
        """.split()),
    "disgusted": frozenset("""
        disgusted disgust disgusting revolted revolting repulsed repulsive grossed gross sickened
        nauseated nauseous loathing loathe revulsion yuck repelled distaste appalled
        """.split()),
    "worried": frozenset("""
        worried worry worries worrying worriedly anxious anxiously anxiety nervous nervously
        nervousness concerned uneasy unease apprehensive tense stressed stress troubled fretful
        fretting jittery restless insecure
        """.split()),
    "neutral": frozenset("""
        neutral neutrally calm calmly calmness plain expressionless blank impassive relaxed
        composed serene indifferent emotionless deadpan normal ordinary unemotional placid
        """.split()),
}

# What a negated emotion word votes for. "not happy" reads as sad and "not sad" as happy; the
# other emotions negated only say the emotion is absent, which is closest to neutral ("no fear",
# "not angry"). A negated neutral word ("not calm", "not relaxed") reads as unease: worried.
NEGATED = {
    "happy": "sad",
    "sad": "happy",
    "angry": "neutral",
    "surprised": "neutral",
    "fearful": "neutral",
    "disgusted": "neutral",
    "worried": "neutral",
    "neutral": "worried",
}

NEGATORS = frozenset("""
    not no never nor neither without hardly barely scarcely cannot nothing none nobody
    cant dont doesnt didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt aint havent
    hasnt hadnt
    """.split())
CLAUSE_BREAKS = frozenset(". , ; : ! ? but however although though".split())
NEGATION_WINDOW = 3  # words before an emotion word in which a negator counts

_WORD_TO_KEYWORD = {word: keyword for keyword, words in LEXICON.items() for word in words}
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,;:!?]")

assert set(LEXICON) == set(EMOTIONS) == set(NEGATED), "the lexicon must cover the 8 keywords"
assert len(_WORD_TO_KEYWORD) == sum(map(len, LEXICON.values())), "a word in two keywords' lists"


def _keyword_list() -> str:
  return ", ".join(EMOTIONS)


def check_keyword(word: str) -> str:
  """An emotion keyword as a user or a classifier may spell it -> the keyword of `EMOTIONS`.

  Case and surrounding spaces are ignored and `KEYWORD_ALIASES` are accepted ("Fear" ->
  "fearful", "surprise" -> "surprised", "joy" -> "happy"); anything else raises ValueError.
  """
  normalised = str(word).strip().lower()
  if normalised in EMOTIONS:
    return normalised
  if normalised in KEYWORD_ALIASES:
    return KEYWORD_ALIASES[normalised]
  raise UserError(f"unknown emotion {word!r}; use one of {_keyword_list()}.")


def parse_emotion(spec: str) -> tuple[tuple[str, float], ...]:
  """`--emotion` as a user writes it -> ((keyword, weight), ...), weights summing to 1.

  "happy" is ((happy, 1.0),); a blend "happy:0.7,surprised:0.3" mixes keywords by relative
  weights (non-negative, not all zero; normalised to sum 1, so "happy:2,sad:2" is an even mix),
  each keyword spelled as `check_keyword` accepts and named once.
  """
  parts = [part.strip() for part in str(spec).split(",")]
  if len(parts) == 1 and ":" not in parts[0]:
    return ((check_keyword(parts[0]), 1.0),)
  weights: dict[str, float] = {}
  for part in parts:
    word, colon, number = part.partition(":")
    if not colon:
      raise UserError(f"emotion blend {spec!r}: {part!r} has no weight; write keyword:weight "
                      "pairs separated by commas, e.g. happy:0.7,surprised:0.3.")
    keyword = check_keyword(word)
    try:
      weight = float(number)
    except ValueError:
      weight = math.nan
    if not math.isfinite(weight) or weight < 0:
      raise UserError(f"emotion blend {spec!r}: the weight of {word.strip()!r} is {number!r}; "
                      "give a number >= 0.")
    if keyword in weights:
      raise UserError(f"emotion blend {spec!r} names {keyword!r} twice; name each keyword once.")
    weights[keyword] = weight
  total = sum(weights.values())
  if total <= 0:
    raise UserError(f"emotion blend {spec!r}: the weights are all zero; give at least one "
                    "positive weight.")
  return tuple((keyword, weight / total) for keyword, weight in weights.items())


def emotion_name(parts: tuple[tuple[str, float], ...]) -> str:
  """The canonical name of a parsed emotion: the keyword, or "happy:0.70,surprised:0.30"."""
  if len(parts) == 1:
    return parts[0][0]
  return ",".join(f"{keyword}:{weight:.2f}" for keyword, weight in parts)


def _tokens(text: str) -> list[str]:
  return _TOKEN.findall(text.lower().replace("\u2019", "'").replace("`", "'"))


def _is_negator(token: str) -> bool:
  return token in NEGATORS or token.endswith("n't")


def lexicon_votes(text: str) -> list[str]:
  """The keyword each emotion word of `text` votes for, in text order, negation applied."""
  tokens = _tokens(text)
  votes = []
  for position, token in enumerate(tokens):
    keyword = _WORD_TO_KEYWORD.get(token)
    if keyword is None:
      continue
    negators = 0
    for before in reversed(tokens[max(0, position - NEGATION_WINDOW):position]):
      if before in CLAUSE_BREAKS:
        break
      negators += _is_negator(before)
    votes.append(NEGATED[keyword] if negators % 2 else keyword)
  return votes


def _from_classifier(text: str, classifier: TextClassifier) -> str:
  result = classifier(text)
  if isinstance(result, str):
    try:
      return check_keyword(result)
    except ValueError:
      raise ValueError(f"the text classifier returned the label {result!r}, which is not an "
                       f"emotion keyword; map its labels to one of {_keyword_list()}.") from None
  if isinstance(result, Mapping):
    if not result:
      raise ValueError(f"the text classifier returned no scores for {text!r}.")
    scores: dict[str, float] = {}
    for label, score in result.items():
      try:
        keyword = check_keyword(label)
      except ValueError:
        raise ValueError(f"the text classifier returned the label {label!r}, which is not an "
                         f"emotion keyword; map its labels to one of {_keyword_list()}."
                         ) from None
      scores[keyword] = max(scores.get(keyword, float("-inf")), float(score))
    return max(scores, key=scores.__getitem__)
  raise ValueError(f"the text classifier returned a {type(result).__name__}; it must return a "
                   "keyword (str) or scores per keyword (a mapping of str to float).")


def keyword_from_text(text: str, classifier: TextClassifier | None = None) -> str:
  """An emotion description -> one of `EMOTIONS`: by `classifier` when given, else the lexicon.

  Raises ValueError when the lexicon finds no emotion word in `text`, or when the classifier
  returns a label that is not a keyword.
  """
  if classifier is not None:
    return _from_classifier(text, classifier)
  votes = lexicon_votes(text)
  if not votes:
    raise UserError(f"no emotion word found in the text {text!r}; describe it with one of "
                    f"{_keyword_list()} (or a synonym), or pass --emotion WORD instead.")
  counts = {keyword: votes.count(keyword) for keyword in votes}
  last_vote = {keyword: position for position, keyword in enumerate(votes)}
  return max(counts, key=lambda keyword: (counts[keyword], last_vote[keyword]))
