"""The core's import graph: the demo / experiment code in ``lightning_merge.examples`` is never imported by
the core, and ``import lightning_merge`` alone does not import ``lightning`` (the Lightning layer loads on
first use). Each check runs in a fresh interpreter, so modules other tests imported do not count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("lightning_merge", "lightning_merge.lightning", "lightning_merge.learned", "lightning_merge.mergekit",
        "lightning_merge.cli")
EXAMPLES = ("corpora", "demo", "encoder", "make_recipe_models", "workflow")


def _modules_after(statement: str) -> list[str]:
    """The names in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_core_never_imports_the_examples():
    modules = _modules_after("import " + ", ".join(CORE))
    assert set(CORE) <= set(modules)
    assert "lightning" in modules  # the Lightning layer itself was imported, so the check is not vacuous
    assert [m for m in modules if m == "lightning_merge.examples" or m.startswith("lightning_merge.examples.")] == []


def test_import_lightning_merge_alone_does_not_import_lightning():
    modules = _modules_after("import lightning_merge")
    assert "lightning_merge" in modules
    assert [m for m in modules if m == "lightning" or m.startswith("lightning.")] == []
    assert [m for m in modules if m.startswith("lightning_merge.examples")] == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_moved_modules_live_only_under_examples(name):
    assert (ROOT / "lightning_merge" / "examples" / f"{name}.py").is_file()
    assert not (ROOT / "lightning_merge" / f"{name}.py").exists()
    assert not (ROOT / "lightning_merge" / "lightning" / f"{name}.py").exists()


def test_the_examples_package_imports_none_of_its_modules():
    modules = _modules_after("import lightning_merge.examples")
    assert [m for m in modules if m.startswith("lightning_merge.examples.")] == []
    assert [m for m in modules if m == "lightning" or m.startswith("lightning.")] == []
