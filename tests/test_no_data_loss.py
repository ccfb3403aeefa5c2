"""No data lost, no raw tracebacks: inputs never overwritten, checks before work, clean failures.

Real saved Hugging Face models, the real command in-process (``cli.main``) and real files; faults
are real where this machine allows (a read-only and a nearly full tmpfs when run as root) and
injected into the writer otherwise (ENOSPC, EIO, EACCES mid-write).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safety_helpers import (
    leftovers,
    save_llamas,
    snapshot,
    tensors,
    ties_config,
    tmpfs,
    write_yaml,
)

from lightning_merge import Ties, merge_models
from lightning_merge.cli import main
from lightning_merge.errors import ConfigError, OutputError, SourceError
from lightning_merge.targets import atomic


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return save_llamas(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def work(zoo, tmp_path) -> Path:
    """A private copy of the zoo (tests may try to damage it) plus a config."""
    for name in ("base", "e0", "e1"):
        shutil.copytree(zoo / name, tmp_path / name)
    write_yaml(tmp_path / "cfg.yml", ties_config(tmp_path))
    return tmp_path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["merge", *args])
    got = capsys.readouterr()
    return code, got.out, got.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lightning-merge: error:")]


# ------------------------------------------------------------------------------ inputs are sacred

@pytest.mark.parametrize("target", ["base", "e0", "base/model.safetensors", "e1/sub/out", "."])
def test_cli_refuses_an_output_that_is_or_touches_an_input(work, capsys, monkeypatch, target):
    monkeypatch.chdir(work)
    before = {n: snapshot(work / n) for n in ("base", "e0", "e1")}
    code, out, err = run(capsys, "cfg.yml", target, "--overwrite")
    assert code == 2 and out == ""
    [line] = error_lines(err)
    assert "would destroy the input" in line and "Traceback" not in err
    assert {n: snapshot(work / n) for n in ("base", "e0", "e1")} == before
    assert not (work / "e1" / "sub").exists()


def test_symlinked_output_is_resolved(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (work / "alias").symlink_to(work / "e1", target_is_directory=True)
    before = snapshot(work / "e1")
    code, _, err = run(capsys, "cfg.yml", "alias", "--overwrite")
    [line] = error_lines(err)
    assert code == 2 and "output 'alias' is the input" in line
    assert snapshot(work / "e1") == before


def test_merge_models_refuses_input_paths_and_sources(work):
    from lightning_merge.sources.resolve import open_source

    before = snapshot(work / "base")
    for out in (work / "base", work / "base" / "x.safetensors", work / "e0" / "model.safetensors"):
        with pytest.raises(OutputError, match="would destroy the input"):
            merge_models(work / "base", [work / "e0", work / "e1"], Ties(), out=out, overwrite=True)
    src = open_source(str(work / "e0"))  # a Source object: its folder counts as an input too
    with pytest.raises(OutputError, match="would destroy the input"):
        merge_models(work / "base", [src], Ties(), out=work / "e0", overwrite=True)
    assert snapshot(work / "base") == before


# ----------------------------------------------------------------------------- checks before work

@pytest.mark.parametrize(("device", "needle"), [
    ("gpu", "write 'cuda'"), ("cuda", "CUDA"), ("cuda:7", "CUDA"), ("tpu9", "not a torch device"),
    ("mps", "MPS"),
])
def test_device_is_checked_first(work, capsys, device, needle):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, str(work / "cfg.yml"), str(work / "out"), "--device", device)
    [line] = error_lines(err)
    assert code == 2 and needle in line and "--device" in line
    assert "Traceback" not in err and not (work / "out").exists()
    with pytest.raises(ConfigError, match=needle):
        merge_models(work / "base", [work / "e0"], Ties(), out=work / "out2", device=device)


def test_merge_models_argument_types(work):
    b, e = work / "base", [work / "e0", work / "e1"]
    ref = merge_models(b, e, Ties(density=0.2))
    by_name = merge_models(b, e, "ties")  # a string goes through get_method (its defaults)
    default = merge_models(b, e, Ties())
    assert all(torch.equal(by_name[k], default[k]) for k in ref)
    for kwargs, needle in [
        (dict(method=Ties), "is the class; pass an instance"),
        (dict(method=3), "method must be a merge method"),
        (dict(experts=str(work / "e0")), "pass experts=\\["),
        (dict(seed="x"), "seed must be an integer"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(weights="1,1"), "weights must be a list"),
        (dict(out=3), "out must be None"),
        (dict(overwrite="yes", out=work / "o"), "overwrite must be True or False"),
        (dict(out_dtype=3), "out_dtype must be"),
    ]:
        args = {"base": b, "experts": e, "method": Ties(), **kwargs}
        with pytest.raises(ConfigError, match=needle):
            merge_models(**args)
    assert not (work / "o").exists()


def test_duplicate_yaml_keys_and_syntax_errors_name_file_line_column(work, capsys):
    dup = work / "dup.yml"
    dup.write_text("merge_method: ties\nbase_model: base\nmodels:\n  - model: e0\n"
                   "    parameters:\n      density: 0.5\n      weight: 1\n      density: 0.2\n")
    code, _, err = run(capsys, str(dup), str(work / "out"))
    [line] = error_lines(err)
    assert code == 2 and f"{dup}:8:7: duplicate key 'density' (first set on line 6)" in line
    top = work / "top.yml"
    top.write_text("merge_method: ties\nmerge_method: dare_ties\nbase_model: base\n")
    code, _, err = run(capsys, str(top), str(work / "out"))
    assert code == 2 and f"{top}:2:1: duplicate key 'merge_method'" in err
    bad = work / "bad.yml"
    bad.write_text("merge_method: ties\nmodels:\n  - model: e0\n   parameters: [\n")
    code, _, err = run(capsys, str(bad), str(work / "out"))
    [line] = error_lines(err)
    assert code == 2 and f"{bad}:4:" in line and "<unicode string>" not in line
    assert not (work / "out").exists()


def test_output_exists_message_names_the_flag(work, capsys):
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, str(work / "cfg.yml"), str(work / "out"))
    [line] = error_lines(err)
    assert code == 2 and "--overwrite" in line and "overwrite=True" not in line
    assert (work / "out" / "keep.txt").read_text() == "mine"


def test_parent_must_be_a_writable_directory(work, capsys):
    (work / "afile").write_text("x")
    code, _, err = run(capsys, str(work / "cfg.yml"), str(work / "afile" / "out"))
    [line] = error_lines(err)
    assert code == 2 and "is a file" in line
    with tmpfs(work / "ro", "1m", readonly=True) as mounted:
        if not mounted:
            pytest.skip("cannot mount a read-only tmpfs here (needs root)")
        code, _, err = run(capsys, str(work / "cfg.yml"), str(work / "ro" / "out"))
        [line] = error_lines(err)
        assert code == 2 and "read-only filesystem" in line and ".tmp-" not in line


def test_free_space_is_checked_with_both_numbers(work, capsys):
    with tmpfs(work / "small", "64k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        code, _, err = run(capsys, str(work / "cfg.yml"), str(work / "small" / "out"))
        [line] = error_lines(err)
        assert code == 2 and "the merge writes about" in line and "free" in line
        assert os.listdir(work / "small") == []


# --------------------------------------------------------------------------- write errors midway

class _FailingFile:
    """A real file whose writes fail with ``err`` once ``after`` bytes have gone through."""

    def __init__(self, f, after: int, err: int):
        self.f, self.left, self.err = f, after, err

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.left:
            raise OSError(self.err, os.strerror(self.err))
        self.left -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize(("code", "hint"), [(errno.ENOSPC, "free some space"), (errno.EIO, "check the disk"),
                                            (errno.EACCES, "permission denied")])
def test_write_error_midway_names_the_users_path_and_leaves_nothing(work, capsys, monkeypatch, code, hint):
    from lightning_merge.targets import shards

    real_open = open
    monkeypatch.setattr(shards, "open", lambda p, mode="r", *a, **k: _FailingFile(real_open(p, mode, *a, **k),
                                                                               60_000, code), raising=False)
    out = work / "merged"
    rc, _, err = run(capsys, str(work / "cfg.yml"), str(out))
    [line] = error_lines(err)
    assert rc == 2 and f"could not write '{out}" in line and hint in line and ".tmp-" not in line
    assert leftovers(work, "merged") == [] and not out.exists()
    with pytest.raises(OutputError, match="could not write"):
        merge_models(work / "base", [work / "e0"], Ties(), out=work / "one.safetensors")
    assert leftovers(work, "one.safetensors") == [] and not (work / "one.safetensors").exists()


# ------------------------------------------------------------------------------ killed-run leftovers

def test_leftovers_of_killed_runs_are_recognised_and_removed(work, capsys, caplog):
    out = work / "merged"
    stale = work / "merged.tmp-0123abcd"
    stale.mkdir()
    (stale / atomic.MARKER).write_text("{}")
    (stale / ".model-part-00000-ffff.safetensors.partial").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="lightning_merge"):
        assert main(["merge", str(work / "cfg.yml"), str(out)]) == 0
    assert not stale.exists() and out.is_dir()
    assert leftovers(work, "merged") == []
    foreign = work / "merged2.tmp-89abcdef"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    code, _, err = run(capsys, str(work / "cfg.yml"), str(work / "merged2"))
    assert code == 2 and "not recognisably lightning-merge's" in err
    assert (foreign / "notes.txt").read_text() == "not ours"


def test_a_previous_version_left_by_a_killed_replace_is_restored(work):
    out = work / "merged"
    merge_models(work / "base", [work / "e0"], Ties(), out=out)
    ref = tensors(out)
    old = work / "merged.old-00aa11bb"
    os.rename(out, old)  # as if killed between 'rename old aside' and 'rename new in'
    (work / ".merged.lightning-merge.lock").write_text('{"old": "merged.old-00aa11bb"}')
    with pytest.raises(OutputError, match="already exists"):  # it is back, so no overwrite: refused
        merge_models(work / "base", [work / "e1"], Ties(), out=out)
    assert not old.exists()
    torch.testing.assert_close(tensors(out), ref, rtol=0, atol=0)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_sigint(work, signame):
    import signal

    from lightning_merge.targets import shards

    sig = getattr(signal, signame)
    real_open = open

    class Signalling(_FailingFile):
        def write(self, data):
            os.kill(os.getpid(), sig)  # delivered to this (main) thread before the next bytecode
            return self.f.write(data)

    out = work / "merged"
    mp = pytest.MonkeyPatch()
    mp.setattr(shards, "open", lambda p, mode="r", *a, **k: Signalling(real_open(p, mode, *a, **k), 0, 0),
               raising=False)
    inherited = signal.signal(sig, signal.SIG_DFL)  # e.g. SIG_IGN under nohup: the command respects that
    try:
        assert main(["merge", str(work / "cfg.yml"), str(out)]) == 128 + sig
        assert leftovers(work, "merged") == [] and not out.exists()
        assert signal.getsignal(sig) == signal.SIG_DFL
    finally:
        mp.undo()
        signal.signal(sig, inherited)


def test_an_ignored_sighup_stays_ignored(work):
    """Under ``nohup`` (SIGHUP ignored) the command leaves the disposition alone and merges."""
    import signal

    inherited = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert main(["merge", str(work / "cfg.yml"), str(work / "merged")]) == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, inherited)


# ----------------------------------------------------------------------------- saying what happens

def test_expert_missing_tensors_gets_one_warning(work, caplog):
    sd = load_file(str(work / "e0" / "model.safetensors"))
    for k in [k for k in sd if ".layers.1." in k or ".layers.2.mlp" in k]:
        del sd[k]
    save_file(sd, str(work / "e0" / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="lightning_merge"):
        merge_models(work / "base", [work / "e0", work / "e1"], Ties())
    [rec] = [r for r in caplog.records if "lacks" in r.getMessage()]
    assert "lacks 12 of the base's" in rec.getMessage() and "model.layers 1-2" in rec.getMessage()


def test_cli_prints_applied_values_per_layer_and_one_summary(work, capsys):
    cfg = ties_config(work)
    cfg["models"][0]["parameters"]["density"] = [1, 0.7, 0.1]
    write_yaml(work / "grad.yml", cfg)
    code, out, err = run(capsys, str(work / "grad.yml"), str(work / "out"))
    assert code == 0
    assert "density per layer: layer 0: [1, 0.5]; layer 1: [0.7, 0.5]; layer 2: [0.1, 0.5]" in err
    assert "density=[1.0, 0.5]" not in err
    assert out.count("merged") == 1 and "merged 2 expert" not in err  # one summary line, on stdout
    slerp = {"merge_method": "slerp", "base_model": str(work / "base"),
             "models": [{"model": str(work / "base")}, {"model": str(work / "e0")}],
             "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}}
    write_yaml(work / "slerp.yml", slerp)
    code, _, err = run(capsys, str(work / "slerp.yml"), str(work / "out2"))
    assert code == 0 and "t per layer: layer 0: 0.5 (" in err and "0 (self_attn)" in err
    assert "1 (self_attn)" in err and "Slerp(t=0.5" not in err


def test_peft_export_warns_with_the_rank_that_would_do(work, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_merge"):
        report = merge_models(work / "base", [work / "e0"], Ties(), out=work / "adapter", out_format="peft",
                              adapter_rank=2)
    [rec] = [r for r in caplog.records if "relative error above 0.1" in r.getMessage()]
    need = max(report.needed_rank.values())
    assert f"rank {need} would bring every module under 0.1" in rec.getMessage()
    bigger = merge_models(work / "base", [work / "e0"], Ties(), out=work / "adapter2", out_format="peft",
                          adapter_rank=need)
    assert max(bigger.values()) <= 0.1 + 1e-5
    assert not bigger.needed_rank


# ------------------------------------------------------------------------------ content identity

def test_callback_hash_follows_file_content_not_path(work):
    from lightning_merge import MergeCallback

    def h(*experts):
        return MergeCallback(experts=[str(e) for e in experts], method=Ties()).config_hash

    first = h(work / "e0", work / "e1")
    shutil.copytree(work / "e0", work / "copy")  # same bytes elsewhere (new mtimes): same identity
    assert h(work / "copy", work / "e1") == first
    sd = load_file(str(work / "e0" / "model.safetensors"))
    save_file({k: v + 1e-3 for k, v in sd.items()}, str(work / "e0" / "model.safetensors"),
              metadata={"format": "pt"})  # re-trained in place: same path, same header
    assert h(work / "e0", work / "e1") != first


def test_truncated_input_file_is_an_error_not_a_crash(work):
    path = work / "e1" / "model.safetensors"
    calls = []

    def params(name: str) -> dict:  # called once per tensor as the merge reads it: truncate midway
        calls.append(name)
        if len(calls) == 8:
            os.truncate(path, path.stat().st_size // 2)
        return {}

    with pytest.raises(SourceError, match="changed on disk while it was being merged"):
        merge_models(work / "base", [work / "e0", work / "e1"], Ties(), out=work / "merged", tensor_params=params)
    assert leftovers(work, "merged") == [] and not (work / "merged").exists()


def test_a_held_output_lock_stops_a_second_run_at_once(work, capsys):
    out = work / "merged"
    with atomic.output_lock(out):  # as another process writing OUT right now would hold it
        code, _, err = run(capsys, str(work / "cfg.yml"), str(out))
    [line] = error_lines(err)
    assert code == 2 and f"is writing '{out}' right now" in line and f"pid {os.getpid()}" in line
    assert not out.exists() and leftovers(work, "merged") == []


def test_the_config_file_itself_is_protected(work, capsys):
    before = (work / "cfg.yml").read_text()
    code, _, err = run(capsys, str(work / "cfg.yml"), str(work / "cfg.yml"), "--overwrite")
    assert code == 2 and "would destroy the input" in err
    assert (work / "cfg.yml").read_text() == before
