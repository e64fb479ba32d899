"""docs/ARCHITECTURE.md stays true to the tree: its Layout block lists exactly the modules that
exist, every citation of it uses the repository path and names a section it has, and every
`docs/...` path a docstring or markdown file mentions exists. Text only: no jax, runs in
milliseconds."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# Folders whose every module the Layout block must list (tools/ where it exists).
LISTED_PACKAGES = ("etalk_jax", "data_pipeline", "configs", "benchmarks", "tools")
# Where the project's own text lives (never a virtual environment or a build folder).
TEXT_FOLDERS = ("etalk_jax", "data_pipeline", "configs", "benchmarks", "tests", "tools", "docs")
TOP_LEVEL_TEXT = ("Makefile", ".ci/run")
# Written in two parts so that this file does not cite the old location itself.
SHARED_DESIGN = "shared/design/" + "ARCHITECTURE.md"
CITATION = re.compile(r"ARCHITECTURE\.md")
SECTION_REFERENCE = re.compile(
    r"ARCHITECTURE\.md((?:\s*(?:,|-|and)?\s*(?:§\s?|section\s+)\d+(?:\.\d+)?)+)")
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*[\w]")


def _layout_entries() -> list[str]:
  """The paths of the fenced block in the "Layout" section, one per line (the line's first
  word; a folder ends in "/")."""
  text = ARCHITECTURE.read_text(encoding="utf-8")
  section = re.search(r"^## \d+\. Layout\n(.*?)(?=^## )", text, re.M | re.S)
  assert section, "docs/ARCHITECTURE.md has no '## N. Layout' section"
  block = re.search(r"^```\n(.*?)^```", section.group(1), re.M | re.S)
  assert block, "the Layout section has no fenced block"
  return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def _text_files() -> list[Path]:
  files = [path for name in TEXT_FOLDERS if (ROOT / name).is_dir()
           for pattern in ("*.py", "*.md") for path in (ROOT / name).rglob(pattern)]
  files += sorted(ROOT.glob("*.md"))
  files += [ROOT / name for name in TOP_LEVEL_TEXT if (ROOT / name).is_file()]
  return files


def _sections() -> set[str]:
  """Numbers of ARCHITECTURE.md's sections ("5") and of §3's numbered decisions ("3.11")."""
  text = ARCHITECTURE.read_text(encoding="utf-8")
  sections = set(re.findall(r"^## (\d+)\.", text, re.M))
  decisions = re.search(r"^## 3\..*?(?=^## )", text, re.M | re.S)
  if decisions:
    sections |= {f"3.{n}" for n in re.findall(r"^(\d+)\. \*\*", decisions.group(0), re.M)}
  return sections


def test_every_layout_path_exists():
  missing = [entry for entry in _layout_entries() if not (ROOT / entry).exists()]
  assert not missing, f"docs/ARCHITECTURE.md's Layout lists paths that do not exist: {missing}"


def test_every_module_and_package_is_in_the_layout():
  listed = set(_layout_entries())
  unlisted = []
  for package in LISTED_PACKAGES:
    if not (ROOT / package).is_dir():
      continue
    for module in sorted((ROOT / package).rglob("*.py")):
      relative = module.relative_to(ROOT)
      folder = relative.parent.as_posix() + "/"
      if folder not in listed:
        unlisted.append(folder)
      if module.name != "__init__.py" and relative.as_posix() not in listed:
        unlisted.append(relative.as_posix())
  assert not unlisted, ("docs/ARCHITECTURE.md's Layout does not list "
                        f"{sorted(set(unlisted))}: add a line for each")


def test_no_file_cites_the_shared_design():
  citing = [str(path.relative_to(ROOT)) for path in _text_files()
            if SHARED_DESIGN in path.read_text(encoding="utf-8", errors="replace")]
  assert not citing, f"these still cite the design outside the repository: {citing}"


def test_every_citation_uses_the_repository_path():
  wrong = []
  for path in _text_files():
    if path == Path(__file__).resolve():
      continue  # the checker names the file in every form
    text = path.read_text(encoding="utf-8", errors="replace")
    for match in CITATION.finditer(text):
      if text[max(match.start() - 5, 0):match.start()] != "docs/":
        line = text.count("\n", 0, match.start()) + 1
        wrong.append(f"{path.relative_to(ROOT)}:{line}")
  assert not wrong, f"cite the design as docs/ARCHITECTURE.md: {wrong}"


def test_every_cited_section_exists():
  sections = _sections()
  unknown = []
  for path in _text_files():
    text = path.read_text(encoding="utf-8", errors="replace")
    for match in SECTION_REFERENCE.finditer(text):
      for number in re.findall(r"\d+(?:\.\d+)?", match.group(1)):
        if number not in sections:
          unknown.append(f"{path.relative_to(ROOT)}: §{number}")
  assert not unknown, f"citations of sections docs/ARCHITECTURE.md does not have: {unknown}"


def test_every_cited_docs_path_exists():
  missing = []
  for path in _text_files():
    text = path.read_text(encoding="utf-8", errors="replace")
    for cited in DOCS_PATH.findall(text) if "docs/" in text else ():
      if not (ROOT / cited.rstrip(".")).exists():
        missing.append(f"{path.relative_to(ROOT)}: {cited}")
  assert not missing, f"these cite docs/ paths that do not exist: {missing}"
