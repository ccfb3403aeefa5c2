"""The registry: one explicit list of methods, each describing itself (name, reference, YAML form,
documented parameters, capabilities); the mergekit table and the docs derive from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lightning_merge.errors import ConfigError
from lightning_merge.methods.registry import BUILTIN, MERGEKIT_0_1_5, mergekit_specs, method_class, method_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("cls", BUILTIN, ids=lambda c: c.name)
def test_each_method_describes_itself(cls):
    assert cls.name and cls.reference, cls
    doc = cls.__doc__ or ""
    undocumented = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in doc]
    assert not undocumented, f"{cls.__name__}: help() does not explain {undocumented}"
    assert f"`{cls.__name__}`" in README and f"`{cls.name}`" in README  # the README's method table
    assert method_class(cls.name) is cls


@pytest.mark.parametrize("name", sorted(mergekit_specs()))
def test_mergekit_defaults_translate_to_a_valid_method(name):
    cls, spec = mergekit_specs()[name]
    shared = {k: p.default for k, p in spec.params.items() if not p.per_model}
    per = {k: [p.default] * 2 for k, p in spec.params.items() if p.per_model}
    if name in ("slerp", "nearswap"):  # t is required there
        shared["t"] = 0.5
    ours, kwargs = spec.translate(shared, per, [])
    assert method_class(ours) is cls
    cls(**kwargs)  # validates


def test_unsupported_means_not_registered():
    from lightning_merge.mergekit import UNSUPPORTED_MERGEKIT

    assert set(UNSUPPORTED_MERGEKIT) == set(MERGEKIT_0_1_5) - set(mergekit_specs())
    assert set(UNSUPPORTED_MERGEKIT) == set()  # every mergekit 0.1.5 method has a class


def test_capabilities_are_properties_not_patched_per_instance():
    from lightning_merge import Ties

    assert Ties(trim_scope="global").statistics_passes == 2 and Ties().statistics_passes == 0
    assert "statistics_passes" not in vars(Ties(trim_scope="global"))


def test_sens_scaled_is_registered_and_nameable_in_yaml(tmp_path):
    from lightning_merge.mergekit import parse_config

    assert "sens_scaled" in method_names()
    with pytest.raises(ConfigError) as err:
        (tmp_path / "b").mkdir(), (tmp_path / "e").mkdir()
        parse_config({"merge_method": "sens_scaled", "base_model": str(tmp_path / "b"),
                      "models": [{"model": str(tmp_path / "e")}],
                      "parameters": {"factors": str(tmp_path / "missing.json"), "method": "ties"}})
    assert "unknown method" not in str(err.value) and "missing.json" in str(err.value)
