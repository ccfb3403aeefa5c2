"""Fault injection, in the default run (seeded and bounded): ``kill -9`` at random moments,
fuzzed YAML configs, two merges racing for one output.

Every case uses the real ``lightning-merge`` command on real saved models. What must hold: the
final path is absent or complete, a rerun is bit-identical, bad input is one
``lightning-merge: error:`` line with status 2 (never a traceback), and an output never mixes
two runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safety_helpers import assert_bitwise_equal, cli, leftovers, save_llamas, tensors, ties_config, write_yaml

from lightning_merge.cli import main
from lightning_merge.mergekit import parse_config

#: about 10M parameters per model: the merge and its writes take ~1 s of a ~3 s command
MID = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=4096)


@pytest.fixture(scope="module")
def mid(tmp_path_factory) -> Path:
    root = save_llamas(tmp_path_factory.mktemp("mid"), 2, MID)
    write_yaml(root / "ties.yml", ties_config(root))
    dare = ties_config(root)
    dare["merge_method"] = "dare_ties"
    write_yaml(root / "dare.yml", dare)
    return root


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lightning_merge.cli", "merge", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


@pytest.mark.parametrize("kills", [8, pytest.param(20, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_never_leaves_a_partial_output(mid, tmp_path, kills):
    """``kills`` runs into one OUT (``--overwrite``), each SIGKILLed at a seeded moment of a full run's
    duration: after every kill OUT is absent or bit-identical to the reference; the next run
    cleans up what the killed one left; the final run is bit-identical and leaves nothing else."""
    out = tmp_path / "merged"
    t0 = time.perf_counter()
    ref_run = cli("merge", str(mid / "ties.yml"), str(tmp_path / "reference"))
    duration = time.perf_counter() - t0
    assert ref_run.returncode == 0, ref_run.stderr
    ref = tensors(tmp_path / "reference")
    rng = random.Random(20261202)
    hit_mid_write = 0
    for _ in range(kills):
        proc = _spawn(str(mid / "ties.yml"), str(out), "--overwrite")
        time.sleep(rng.uniform(0.45, 1.05) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if out.exists():
            assert_bitwise_equal(tensors(out), ref)
        hit_mid_write += any(".tmp-" in n for n in leftovers(tmp_path, "merged"))
    final = cli("merge", str(mid / "ties.yml"), str(out), "--overwrite")
    assert final.returncode == 0, final.stderr
    assert_bitwise_equal(tensors(out), ref)
    assert leftovers(tmp_path, "merged") == []
    assert hit_mid_write >= kills // 7, f"only {hit_mid_write} of {kills} kills landed while writing"


def test_two_concurrent_merges_into_one_output_never_mix(mid, tmp_path):
    refs = {}
    for name in ("ties", "dare"):  # what each command writes alone (the recipe is what the command runs)
        parse_config(mid / f"{name}.yml").merge(tmp_path / f"ref_{name}")
        refs[name] = tensors(tmp_path / f"ref_{name}")
    for k, delay in enumerate((0.0, 0.6, 1.8)):
        out = tmp_path / f"out{k}"
        a = _spawn(str(mid / "ties.yml"), str(out))
        time.sleep(delay)
        b = _spawn(str(mid / "dare.yml"), str(out))
        (_, ea), (_, eb) = a.communicate(timeout=300), b.communicate(timeout=300)
        codes = sorted([a.returncode, b.returncode])
        assert codes == [0, 2], (ea, eb)
        loser = eb if b.returncode == 2 else ea
        assert "Traceback" not in loser
        [line] = [x for x in loser.splitlines() if x.startswith("lightning-merge: error:")]
        assert "is writing" in line or "already exists" in line or "appeared" in line, line
        winner = "ties" if a.returncode == 0 else "dare"
        assert_bitwise_equal(tensors(out), refs[winner])
        assert leftovers(tmp_path, out.name) == []


# ---------------------------------------------------------------------------------- fuzzed YAML

_METHODS = ["ties", "dare_ties", "dare_linear", "della", "della_linear", "task_arithmetic", "linear", "slerp",
            "model_stock", "breadcrumbs", "breadcrumbs_ties", "dppa", "adaptive_rms", "sce", "nuslerp", "TIES",
            "passthrough", ""]
_PARAMS = ["density", "weight", "lambda", "epsilon", "t", "normalize", "rescale", "int8_mask", "gamma",
           "filter", "value", "k", "wieght", "densty"]
_scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5), st.booleans(), st.none(),
    st.text(max_size=6), st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, 1e9]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_PARAMS + ["filter", "value"]), inner, max_size=3)),
    max_leaves=6)
_params = st.dictionaries(st.sampled_from(_PARAMS), _values, max_size=4)


def _template(method: str, root: Path) -> dict:
    """A valid config of ``method`` on the tiny zoo (the fuzzer mutates it)."""
    base, e0, e1 = (str(root / n) for n in ("base", "e0", "e1"))
    per = {"weight": 1.0}
    glob: dict = {}
    if method in ("ties", "dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties"):
        per["density"] = 0.5
    if method.startswith("della"):
        per["epsilon"] = 0.1
    if method.startswith("breadcrumbs"):
        per["gamma"] = 0.01
    if method in ("task_arithmetic", "ties", "dare_linear"):
        glob["lambda"] = 0.8
    if method == "slerp":
        return {"merge_method": method, "base_model": base, "models": [{"model": base}, {"model": e0}],
                "parameters": {"t": [0.0, 0.5, 1.0]}, "dtype": "float32"}
    if method == "model_stock":
        per = {}
    models = [{"model": e, "parameters": dict(per)} for e in (e0, e1)]
    cfg = {"merge_method": method, "models": models, "parameters": glob, "dtype": "float32"}
    if method != "linear":
        cfg["base_model"] = base
    return cfg


def _slots(node, path=()):
    """Every (path) to a value inside the config, for the mutations."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, k)
            yield from _slots(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*path, i)
            yield from _slots(v, (*path, i))


@st.composite
def configs(draw, root: Path):
    """A valid config with 0-3 mutations: a value replaced (wrong type, out of range, nested), a key
    deleted, an unknown or misspelled key added, a list entry dropped."""
    cfg = _template(draw(st.sampled_from(_METHODS[:11])), root)
    for _ in range(draw(st.integers(0, 3))):
        slots = list(_slots(cfg))
        path = draw(st.sampled_from(slots))
        parent = cfg
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if op == "set":
            parent[key] = draw(st.one_of(_values, st.sampled_from(_METHODS), st.just(str(root / "nowhere"))))
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(_PARAMS + ["base_modell", "slices", "tokenizer_source", "seed"]))] = \
                draw(_values)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_llamas(tmp_path_factory.mktemp("tiny"), 2)


def test_fuzzed_configs_give_one_error_line_or_a_complete_output(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    counter = iter(range(10**6))
    outcomes = {0: 0, 2: 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cfg=configs(tiny), mangle=st.integers(0, 30))
    def check(cfg, mangle):
        n = next(counter)
        path, out = work / f"c{n}.yml", work / f"out{n}"
        text = yaml.safe_dump(cfg, sort_keys=False)
        if mangle == 0:  # a syntax error somewhere
            cut = len(text) // 2
            text = text[:cut] + ":\n  - [{\n" + text[cut:]
        path.write_text(text)
        import io
        from contextlib import redirect_stderr, redirect_stdout

        err, stdout = io.StringIO(), io.StringIO()
        with redirect_stderr(err), redirect_stdout(stdout):
            code = main(["merge", str(path), str(out)])
        err_text = err.getvalue()
        assert "Traceback" not in err_text
        assert code in (0, 2), (cfg, err_text)
        outcomes[code] += 1
        if code == 2:
            lines = [x for x in err_text.splitlines() if x.startswith("lightning-merge: error:")]
            assert len(lines) == 1 and err_text.rstrip().splitlines()[-1] == lines[0], err_text
            assert "internal error" not in lines[0]
            assert not out.exists() and leftovers(work, out.name) == []
        else:
            assert len(tensors(out)) > 0

    check()
    # both kinds occur: valid configs merge, mutated ones fail cleanly (measured: 33 / 117 of 150)
    assert outcomes[0] >= 10 and outcomes[2] >= 100, outcomes
