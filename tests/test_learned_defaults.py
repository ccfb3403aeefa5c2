"""Learned-merge defaults and exports (issue 17): DAM starts as the uniform soup, the reference's
bias init is an option named for what it does, exports load cleanly by ``from_pretrained`` and by a
glob over ``*.safetensors``, and ``export_dir`` writes a loadable plain model for wrappers too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_learned import fit
from test_learned_helpers import TINY
from torch import nn
from zoo_helpers import save_zoo

from lightning_merge import ConfigError, Linear, merge_models
from lightning_merge.learned import LearnedMerge


def biased_classifier(seed: int = 0) -> nn.Module:
    """The learned tests' tiny Llama classifier with biases on every attention and MLP projection."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return save_zoo(tmp_path_factory.mktemp("learned_defaults"), biased_classifier, (0.02, 0.04), lora_r=2)


def _bias_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith(".bias") and "norm" not in k.lower()]


def test_dam_at_its_defaults_starts_as_the_uniform_soup(zoo):
    m = LearnedMerge(zoo["base"], [zoo["e0"], zoo["e1"]], granularity="column", objective="entropy")
    got = m.export(None)
    soup = merge_models(None, [zoo["e0"], zoo["e1"]], Linear())
    assert _bias_names(soup), "the zoo's classifier must have linear biases for this test to mean anything"
    for k, v in soup.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-6, msg=k)


def test_bias_init_sum_is_the_dam_reference(zoo):
    """``bias_init="sum"`` (the reference's 1.0): every bias starts as the sum of the models' biases."""
    m = LearnedMerge(zoo["base"], [zoo["e0"], zoo["e1"]], granularity="column", objective="entropy",
                     bias_init="sum")
    got = m.export(None)
    e0 = merge_models(None, [zoo["e0"]], Linear())
    e1 = merge_models(None, [zoo["e1"]], Linear())
    for k in _bias_names(e0):
        torch.testing.assert_close(got[k], e0[k] + e1[k], rtol=0, atol=2e-6, msg=k)
    with pytest.raises(ConfigError, match="bias_init = 'mean'"):
        LearnedMerge(zoo["base"], [zoo["e0"]], granularity="column", bias_init="mean")


def test_export_loads_the_same_by_from_pretrained_and_by_glob(zoo, tmp_path):
    from transformers import AutoModelForSequenceClassification

    m = LearnedMerge(zoo["base"], [zoo["e0"], zoo["e1"]], granularity="column", objective="entropy")
    out = m.export(tmp_path / "merged")
    globbed = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    loaded = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(globbed) <= set(loaded) and len(globbed) >= len(loaded) - 1  # a tied head is stored once
    for k, v in globbed.items():
        assert torch.equal(loaded[k], v), k
    assert (out / "learned_coefficients" / "coefficients.safetensors").is_file()  # beside, not among, the weights


class Wrapper(nn.Module):
    """A user's wrapper around the HF model (no ``config``, no ``save_pretrained``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


def test_export_dir_of_a_wrapper_is_the_plain_target(zoo, tmp_path):
    from transformers import AutoModelForSequenceClassification

    inner = AutoModelForSequenceClassification.from_pretrained(zoo["base"], dtype=torch.float32)
    m = LearnedMerge(Wrapper(inner), [zoo["e0"], zoo["e1"]], granularity="tensor", objective="entropy",
                     export_dir=str(tmp_path / "exported"), lr=0.05)
    assert m.target_name == "inner"
    fit(m, tmp_path)
    out = tmp_path / "exported"
    written = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    want = m.export(None, target_only=True)
    assert written and not any(k.startswith("inner.") for k in written)
    assert set(written) <= set(want)
    for k, v in written.items():
        assert torch.equal(v, want[k]), k
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(plain.state_dict()[next(iter(written))], next(iter(written.values())))
    assert isinstance(Path(out / "config.json"), Path) and (out / "config.json").is_file()


#: where the inputs and outputs are: the user's setup, not a tuning knob
SETUP = {"model", "experts", "base", "expert_tasks", "export_dir", "overwrite"}


@pytest.mark.parametrize("recipe", ["adamerging.yaml", "dam.yaml"])
def test_recipes_name_real_parameters_and_say_why_they_differ(recipe):
    """Every LearnedMerge argument of a recipe is a constructor parameter; a value that differs from
    the constructor's default carries a comment on its line saying why."""
    import inspect

    import yaml

    path = Path(__file__).resolve().parents[1] / "recipes" / recipe
    text = path.read_text()
    args = yaml.safe_load(text)["model"]["init_args"]
    params = inspect.signature(LearnedMerge.__init__).parameters
    lines = {line.split(":", 1)[0].strip(): line for line in text.splitlines() if ":" in line}
    for key, value in args.items():
        assert key in params, f"{recipe}: '{key}' is not a LearnedMerge parameter"
        default = params[key].default
        if default is inspect.Parameter.empty or value == default or key in SETUP:
            continue
        assert "#" in lines[key], f"{recipe}: {key}: {value!r} differs from the default {default!r} without a comment"


def test_entropy_objective_trains_on_unlabelled_batches(zoo, tmp_path):
    """Rows without labels (the data module's ignore index -100) train the entropy objective."""
    from test_learned_helpers import token_batches
    from torch.utils.data import DataLoader

    from lightning_merge.lightning.data import IGNORE_INDEX, TensorDictDataset

    data = token_batches().dataset.tensors
    unlabelled = DataLoader(TensorDictDataset(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                              labels=torch.full_like(data["labels"], IGNORE_INDEX)), batch_size=8)
    m = LearnedMerge(zoo["base"], [zoo["e0"], zoo["e1"]], granularity="task", objective="entropy", lr=0.05)
    before = [p.detach().clone() for p in m.coefficients.parameters()]
    fit(m, tmp_path, loader=unlabelled)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.coefficients.parameters(), strict=True))
