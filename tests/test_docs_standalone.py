"""The repository stands alone: nothing in it points to a document outside it, no machine paths.

Every fact the project relies on is written in ``docs/`` with its public source (paper, released
code, torchvision, zarr). These tests scan every text file of the repository and fail on:

- the uppercase word that named the outside reference document (as a whole word; identifiers
  that merely contain it, like ``X_<word>_Y``, are fine) and paths into a ``shared/`` folder;
- absolute paths of a machine (the work, home, root, Users and mnt folders at a filesystem's root)
  anywhere, and ``/tmp/`` in the user-facing documents and pipelines (``*.md``, ``*.toml``);
  tests and code may use temporary folders;
- a ``docs/<name>.md`` that does not exist, and a pointer ``docs/<name>.md, section "<heading>"``
  whose heading is not in that file (the form the code's comments use to point into the docs).

This file is left out of the scans (its planted examples would trip them); the word the first rule
looks for is assembled from pieces, so that a plain text search of the repository finds no copy here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(REPO).as_posix()

_WORD = "REF" + "ERENCE"
OUTSIDE_POINTER = re.compile(r"\b" + _WORD + r"\b")
SHARED_PATH = re.compile(r"(?<![\w.-])" + "shared" + "/")
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:" + "|".join(["wo" + "rk", "ho" + "me", "ro" + "ot", "Us" + "ers", "mn" + "t"]) + ")/")
TMP_PATH = re.compile(r"(?<![\w.~$-])/" + "tmp" + "/")
TMP_CHECKED_SUFFIXES = {".md", ".toml"}
DOCS_FILE = re.compile(r"\bdocs/[\w./-]+\.md\b")
DOCS_SECTION = re.compile(r"\b(docs/[\w./-]+\.md),\s+section\s+\"([^\"]+)\"")

# gitignore patterns are relative to the repository: a leading slash anchors them at its root, not the machine's
SKIP_MACHINE_PATH_RULE = {".gitignore"}
WALK_ROOTS = ("sadpipe", "tests", "docs", "pipelines", "benchmarks", "data")
WALK_FILES = ("README.md", "pyproject.toml")
WALK_SKIP_PARTS = {"__pycache__", ".pytest_cache", "toy", "runs", "work"}


def repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), or a walk of the package's folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=REPO, capture_output=True, check=True).stdout.decode()
        files = [REPO / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [REPO / name for name in WALK_FILES]
        for root in WALK_ROOTS:
            files += [p for p in (REPO / root).rglob("*")
                      if not WALK_SKIP_PARTS.intersection(p.relative_to(REPO).parts[:-1])
                      and not p.name.endswith(".egg-info")]
    return sorted(p for p in files if p.is_file())


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def path_problems(rel: str, text: str) -> list[str]:
    """``rel:line: text`` for every pointer outside the repository and every machine path in ``text``."""
    found = []
    check_machine = Path(rel).name not in SKIP_MACHINE_PATH_RULE
    check_tmp = Path(rel).suffix in TMP_CHECKED_SUFFIXES
    for number, line in enumerate(text.splitlines(), 1):
        hits = [OUTSIDE_POINTER, SHARED_PATH]
        if check_machine:
            hits.append(MACHINE_PATH)
        if check_tmp:
            hits.append(TMP_PATH)
        if any(rule.search(line) for rule in hits):
            found.append(f"{rel}:{number}: {line.strip()}")
    return found


def markdown_headings(text: str) -> set[str]:
    """Heading texts of a markdown file (outside fenced code), whitespace collapsed."""
    headings, fenced = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            headings.add(" ".join(m.group(1).split()))
    return headings


def docs_pointer_problems(rel: str, text: str, exists, headings_of) -> list[str]:
    """Pointers into docs/ that do not resolve: a missing file, or a section heading not in it.

    ``exists(path) -> bool`` and ``headings_of(path) -> set[str]`` look into the repository
    (injected so the rule can be tested on planted text).
    """
    found = []
    for m in DOCS_FILE.finditer(text):
        if not exists(m.group(0)):
            found.append(f"{rel}: {m.group(0)} does not exist")
    for m in DOCS_SECTION.finditer(text):
        doc, section = m.group(1), " ".join(m.group(2).split())
        if exists(doc) and section not in headings_of(doc):
            found.append(f'{rel}: {doc} has no heading "{section}"')
    return found


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    out = {}
    for path in repo_files():
        text = read_text(path)
        if text is not None:
            out[path.relative_to(REPO).as_posix()] = text
    return out


def test_the_scan_sees_the_repository(texts):
    # an empty or partial scan would pass everything below
    for rel in ("README.md", "sadpipe/losses.py", "docs/method.md", "pipelines/toy.toml", SELF):
        assert rel in texts


def test_no_pointer_outside_the_repository_and_no_machine_path(texts):
    found = [problem for rel, text in texts.items() if rel != SELF for problem in path_problems(rel, text)]
    assert not found, ("point to docs/ instead (docs/method.md, docs/geometry.md, docs/zarr_notes.md, "
                       "docs/codec.md) and use paths relative to the repository:\n" + "\n".join(found))


def test_pointers_into_docs_resolve(texts):
    def exists(doc: str) -> bool:
        return (REPO / doc).is_file()

    def headings_of(doc: str) -> set[str]:
        return markdown_headings((REPO / doc).read_text(encoding="utf-8"))

    found = [problem for rel, text in texts.items() if rel != SELF
             for problem in docs_pointer_problems(rel, text, exists, headings_of)]
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------
# The rules themselves, on planted text: each must flag what it is for and pass what it is not.

FLAGGED = [
    ("sadpipe/x.py", f"# see {_WORD} section 3"),
    ("sadpipe/x.py", f"    (gamma = 2; {_WORD}.md section 1)."),
    ("docs/x.md", f"| baseline ({_WORD} 6) |"),
    ("pipelines/x.toml", f"# ({_WORD} section 1: 16 images per iteration)"),
    ("sadpipe/x.py", "/" + "work/" + "shared/" + "notes.md section 1."),
    ("tests/x.py", "see " + "shared/" + "notes.md"),
    ("benchmarks/x.py", "python b.py --inputs '/" + "work/runs/*.pt'"),
    ("docs/x.md", "data in /" + "home/alice/coco"),
    ("docs/x.md", "--set data.root=/" + "tmp/toy"),
    ("pipelines/x.toml", 'root = "/' + 'tmp/toy"'),
]
PASSED = [
    ("tests/x.py", "def test_x(tmp_path): out = tmp_path / 'work' / 'shared_cache'"),
    ("sadpipe/x.py", "Example: --set data.root=/" + "tmp/toy   (code may use temporary folders)"),
    ("sadpipe/x.py", f"EXPECTED_{_WORD}_LOGITS = 1  # an identifier, not the document"),
    ("docs/x.md", "reference implementation: https://github.com/pytorch/vision"),
    ("pipelines/x.toml", 'root = "/data/coco"   # a placeholder for the user\'s dataset'),
    ("docs/x.md", "runs/" + "wo" + "rk/x and data/toy are relative to the repository"),
    (".gitignore", "/" + "work/"),
]


@pytest.mark.parametrize("rel, line", FLAGGED, ids=[f"flagged{i}" for i in range(len(FLAGGED))])
def test_path_rules_flag(rel, line):
    assert path_problems(rel, f"first line\n{line}\n") == [f"{rel}:2: {line.strip()}"]


@pytest.mark.parametrize("rel, line", PASSED, ids=[f"passed{i}" for i in range(len(PASSED))])
def test_path_rules_pass(rel, line):
    assert path_problems(rel, line) == []


def test_docs_pointer_rule():
    docs = {"docs/method.md": {"Normaliser", "Training from scratch (toy task)"}}
    exists, headings_of = docs.__contains__, docs.__getitem__
    missing, misspelt = "docs/missing.md", "Normalizer"
    text = ('see docs/method.md, section "Normaliser"; docs/method.md, section "Training from\n'
            f'scratch (toy task)"; docs/method.md, section "{misspelt}"; {missing}')
    assert docs_pointer_problems("a.py", text, exists, headings_of) == [
        f"a.py: {missing} does not exist",
        f'a.py: docs/method.md has no heading "{misspelt}"',
    ]


def test_markdown_headings():
    text = "# Title\n\n## Normaliser\n```\n# not a heading\n```\n### Beta convention ##\ntext # no\n"
    assert markdown_headings(text) == {"Title", "Normaliser", "Beta convention"}
