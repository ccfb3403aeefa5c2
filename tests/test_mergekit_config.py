"""Translation of mergekit YAML configs into our explicit methods (no tensors are read here)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mergekit_helpers import assert_ignored

from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import (
    MERGEKIT_METHODS,
    LayerIndex,
    MergeRecipe,
    evaluate_setting,
    load_yaml,
    parse_config,
)


def cfg(method: str, models=("e0", "e1"), base="base", **params) -> dict:
    out = {"merge_method": method, "models": [{"model": m} for m in models]}
    if base is not None:
        out["base_model"] = base
    if params:
        out["parameters"] = params
    return out


def model(path: str, **params) -> dict:
    return {"model": path, "parameters": params} if params else {"model": path}


# ------------------------------------------------------------------------------ method mapping table

EXPECTED = {
    "linear": ("Linear", {"normalize": True}),
    "task_arithmetic": ("TaskArithmetic", {"lambda_": 1.0, "normalize": False}),
    "ties": ("Ties", {"density": 1.0, "normalize": True, "lambda_": 1.0, "trim_scope": "tensor",
                      "trim_rule": "exact_k", "election": "weighted", "divisor": "weights",
                      "zero_sign": "positive"}),
    "dare_ties": ("DareTies", {"density": 1.0, "rescale": "l1", "normalize": False, "lambda_": 1.0,
                               "zero_sign": "positive", "extra_trim_density": None}),
    "dare_linear": ("DareLinear", {"density": 1.0, "rescale": "l1", "normalize": False, "lambda_": 1.0}),
    "breadcrumbs": ("Breadcrumbs", {"density": 1.0, "gamma": 0.01, "rescale": "none", "normalize": False,
                                    "lambda_": 1.0}),
    "breadcrumbs_ties": ("BreadcrumbsTies", {"density": 1.0, "gamma": 0.01, "rescale": "none",
                                             "normalize": False, "zero_sign": "positive"}),
    "della": ("Della", {"density": 1.0, "epsilon": 0.3, "rescale": "l1", "normalize": True,
                        "rank_scope": "row", "prob_formula": "code", "zero_sign": "positive"}),
    "della_linear": ("DellaLinear", {"density": 1.0, "epsilon": 0.3, "rescale": "l1", "normalize": False,
                                     "rank_scope": "row", "prob_formula": "code"}),
    "model_stock": ("ModelStock", {"filter_wise": False}),
    "ram": ("Ram", {"epsilon": 1e-5}),
    "ramplus_tl": ("RamPlusTL", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    "sce": ("Sce", {"select_topk": 1.0, "uniform_below": 1e-6}),
    "nuslerp": ("NuSlerp", {"dim": None, "task_vectors": True}),
    "multislerp": ("MultiSlerp", {"normalize_weights": True, "eps": 1e-8, "task_vectors": True}),
    "karcher": ("Karcher", {"max_iter": 10, "tol": 1e-5}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mergekit_defaults_are_passed_explicitly(name):
    cls_name, params = EXPECTED[name]
    r = parse_config(cfg(name))
    assert type(r.method).__name__ == cls_name
    for k, v in params.items():
        assert getattr(r.method, k) == v, k
    assert r.merge_method == name
    assert r.tensor_params is None


def test_every_mergekit_method_is_covered():
    # slerp, passthrough, nearswap and arcee_fusion take other model counts: their own tests cover them
    assert set(MERGEKIT_METHODS) == set(EXPECTED) | {"slerp", "passthrough", "nearswap", "arcee_fusion"}


def test_slerp_mapping():
    r = parse_config(cfg("slerp", models=["base", "e1"], t=0.3))
    assert type(r.method).__name__ == "Slerp" and r.method.t == 0.3
    assert r.base == "base" and r.experts == ["e1"]
    # base_model not listed: still base + the one other model
    r = parse_config(cfg("slerp", models=["e1"], t=0.3))
    assert r.experts == ["e1"]


def test_our_defaults_stay_paper_faithful():
    """The translation never relies on our defaults, which differ from mergekit's."""
    from lightning_merge.methods.dare import DareTies
    from lightning_merge.methods.della import Della
    from lightning_merge.methods.ties import Ties

    assert Ties().density == 0.2 and DareTies().normalize is True and DareTies().rescale == "inverse_prob"
    assert Della().rescale == "inverse_prob" and Della().epsilon == 0.14


@pytest.mark.parametrize(
    "name,flag,value,attr,expected",
    [
        ("dare_ties", "rescale", False, "rescale", "none"),
        ("dare_linear", "rescale", False, "rescale", "none"),
        ("della", "rescale", False, "rescale", "none"),
        ("breadcrumbs", "rescale", True, "rescale", "l1"),
        ("dare_ties", "normalize", True, "normalize", True),
        ("ties", "normalize", False, "normalize", False),
        ("della", "normalize", False, "normalize", False),
        ("linear", "normalize", False, "normalize", False),
        ("task_arithmetic", "normalize", True, "normalize", True),
        ("model_stock", "filter_wise", True, "filter_wise", True),
    ],
)
def test_global_flags(name, flag, value, attr, expected):
    r = parse_config(cfg(name, **{flag: value}))
    assert getattr(r.method, attr) == expected


def test_lambda_and_int8_mask():
    r = parse_config(cfg("ties", **{"lambda": 0.7, "int8_mask": True, "density": 0.5}))
    assert r.method.lambda_ == 0.7 and r.method.density == 0.5


def test_della_epsilon_is_doubled_per_model():
    c = cfg("della", density=0.5, epsilon=0.1)
    c["models"] = [model("e0"), model("e1", epsilon=0.2), model("e2", density=0.6, epsilon="5e-2")]
    r = parse_config(c)
    assert r.method.epsilon == pytest.approx([0.2, 0.4, 0.1])
    assert r.method.density == [0.5, 0.5, 0.6]


def test_della_window_out_of_range_names_the_key():
    # mergekit epsilon 0.3 with density 0.2: keep probabilities would go below 0
    c = cfg("della")
    c["models"] = [model("e0", density=0.2, epsilon=0.3)]
    with pytest.raises(ConfigError, match="merge_method 'della'.*epsilon") as info:
        parse_config(c)
    assert "set by: models[0].parameters.density = 0.2, models[0].parameters.epsilon = 0.3" in str(info.value)


def test_per_model_over_global_and_weights():
    c = cfg("dare_ties", density=0.5, weight=0.5)
    c["models"] = [model("e0", weight=2.0), model("e1", density=0.3), model("e2")]
    r = parse_config(c)
    assert r.weights == [2.0, 0.5, 0.5]
    assert r.method.density == [0.5, 0.3, 0.5]
    assert r.experts == ["e0", "e1", "e2"] and r.base == "base"


def test_missing_weight_defaults_to_one():
    assert parse_config(cfg("task_arithmetic")).weights == [1.0, 1.0]


def test_base_listed_in_models_is_not_an_expert():
    c = cfg("ties", models=["base", "e0"], density=0.5)
    c["models"][0]["parameters"] = {"weight": 3.0}  # ignored, as in mergekit
    r = parse_config(c)
    assert r.experts == ["e0"] and r.weights == [1.0]


def test_linear_averages_base_model_like_mergekit():
    c = cfg("linear", weight=0.25)
    c["models"] = [model("e0", weight=1.0), model("e1", weight=2.0)]
    r = parse_config(c)
    assert r.experts == ["e0", "e1", "base"] and r.weights == [1.0, 2.0, 0.25]
    assert r.base == "base" and any("base_model is averaged" in n for n in r.notes)
    # without base_model: the first model is the config donor only
    r = parse_config(cfg("linear", base=None))
    assert r.experts == ["e0", "e1"] and r.base == "e0" and r.notes == []
    # base listed: an ordinary input with its own weight
    c = cfg("linear", models=["base", "e0"])
    c["models"][0]["parameters"] = {"weight": 3.0}
    r = parse_config(c)
    assert r.experts == ["base", "e0"] and r.weights == [3.0, 1.0]


def test_task_arithmetic_notes_ineffective_density():
    r = parse_config(cfg("task_arithmetic", density=0.5))
    assert any("no effect" in n for n in r.notes)


def test_dtype_seed_and_out_dtype():
    c = cfg("ties", density=0.5)
    c.update(dtype="bfloat16", seed=7)
    r = parse_config(c)
    assert r.out_dtype == torch.bfloat16 and r.seed == 7
    c["out_dtype"] = "float16"
    assert parse_config(c).out_dtype == torch.float16
    assert parse_config(cfg("ties")).out_dtype is None and parse_config(cfg("ties")).seed is None


def test_tokenizer_source_base_accepted():
    for extra in ({"tokenizer_source": "base"}, {"tokenizer": {"source": "base"}}):
        c = cfg("ties")
        c.update(extra)
        assert isinstance(parse_config(c), MergeRecipe)


def test_native_methods_take_our_parameter_names():
    c = cfg("adaptive_rms", **{"drop_scale": 50.0, "lambda": 1.2})
    c["models"] = [model("e0", drop_rate=0.5, weight=2.0), model("e1")]
    r = parse_config(c)
    assert type(r.method).__name__ == "AdaptiveRMS"
    assert r.method.drop_rate == [0.5, 0.7] and r.method.drop_scale == 50.0 and r.method.lambda_ == 1.2
    assert r.weights == [2.0, 1.0]
    r = parse_config(cfg("dppa", density_top=0.2, combination="ties"))
    assert r.method.density_top == 0.2 and r.method.combination == "ties"
    with pytest.raises(ConfigError, match="parameters.bogus"):
        parse_config(cfg("dppa", bogus=1))
    c = cfg("dppa")
    c["models"] = [model("e0", combination="ties")]
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.combination.*top-level"):
        parse_config(c)


# ---------------------------------------------------------------------------- gradients and filters

def test_layer_index_positions():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight"]
    li = LayerIndex(names)
    assert [li.t(f"model.layers.{i}.mlp.up_proj.weight") for i in range(5)] == [0, 0.25, 0.5, 0.75, 1.0]
    assert li.t("model.embed_tokens.weight") == 0.0 and li.t("lm_head.weight") == 0.0
    assert LayerIndex(["model.layers.0.x"]).t("model.layers.0.x") == 1.0  # one layer: t = 1
    gpt2 = LayerIndex([f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)])
    assert gpt2.t("transformer.h.1.attn.c_attn.weight") == 0.5
    # two stacks (encoder/decoder) are counted separately
    t5 = LayerIndex([f"encoder.block.{i}.x" for i in range(3)] + [f"decoder.block.{i}.x" for i in range(5)])
    assert t5.t("encoder.block.2.x") == 1.0 and t5.t("decoder.block.2.x") == 0.5


def _f(x):
    return float(x)


@pytest.mark.parametrize(
    "setting,name,t,expected",
    [
        (0.5, "a", 0.3, 0.5),
        ([0.0, 1.0], "a", 0.25, 0.25),
        ([0.0, 0.5, 0.3, 0.7, 1.0], "a", 0.5, 0.3),
        ([0.0, 0.5, 0.3, 0.7, 1.0], "a", 0.6, 0.3 + 0.4 * 0.4),
        ([0.2, 0.8], "a", 1.0, 0.8),
        ([{"filter": "mlp", "value": 0.1}, {"value": 0.9}], "layers.0.mlp.up", 0.0, 0.1),
        ([{"filter": "mlp", "value": 0.1}, {"value": 0.9}], "layers.0.attn", 0.0, 0.9),
        ([{"filter": "mlp", "value": 0.1}], "attn", 0.0, None),
        ([{"filter": "*", "value": [0.0, 1.0]}], "x", 0.5, 0.5),
        ({"filter": "attn", "value": 0.4}, "self_attn.q", 0.0, 0.4),
        ([{"filter": "q_proj", "value": 1.0}, {"filter": "proj", "value": 2.0}], "x.q_proj", 0.0, 1.0),
    ],
)
def test_evaluate_setting(setting, name, t, expected):
    got = evaluate_setting(setting, name, t, _f)
    assert got == (None if expected is None else pytest.approx(expected))


def test_evaluate_setting_matches_mergekit():
    mk = pytest.importorskip("mergekit.config")
    settings = [
        [0.0, 0.5, 0.3, 0.7, 1.0],
        [1, 0.25],
        [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
         {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}],
        [{"filter": "up", "value": 0.3}],
    ]
    for s in settings:
        mk_setting = mk.MergeConfiguration.model_validate(
            {"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"x": s}}
        ).parameters["x"]
        for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight", "norm"):
            for t in (0.0, 0.1, 1 / 3, 0.5, 0.77, 1.0):
                ref = mk.evaluate_setting(name, mk_setting, t, validate=float)
                assert evaluate_setting(s, name, t, float) == ref


def test_gradients_and_filters_per_tensor():
    c = cfg("ties", density=[{"filter": "mlp", "value": [0.2, 0.8]}, {"filter": "self_attn", "value": 0.4},
                             {"value": 0.6}])
    c["models"] = [model("e0", weight=[1.0, 3.0]), model("e1", weight=[{"filter": "q_proj", "value": 2.0}]),
                   model("e2", weight=0.5, density=0.9)]
    r = parse_config(c)
    assert r.method.density == [0.6, 0.6, 0.9] and r.weights == [1.0, 1.0, 0.5]
    tp = r.tensor_params
    assert tp is not None
    tp.layer_index = LayerIndex([f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)])
    p = tp("model.layers.1.mlp.up_proj.weight")  # t = 0.5
    assert p["density"] == pytest.approx([0.5, 0.5, 0.9]) and p["weights"] == [2.0, 1.0, 0.5]
    p = tp("model.layers.2.self_attn.q_proj.weight")  # t = 1
    assert p["density"] == [0.4, 0.4, 0.9] and p["weights"] == [3.0, 2.0, 0.5]
    p = tp("model.embed_tokens.weight")  # t = 0
    assert p["density"] == [0.6, 0.6, 0.9] and p["weights"] == [1.0, 1.0, 0.5]
    # every explicit parameter is in the override, so with_params gives the whole method
    method = r.method.with_params(**{k: v for k, v in p.items() if k != "weights"})
    assert method == r.method


def test_slerp_filtered_t_without_default():
    c = cfg("slerp", models=["e1"], t=[{"filter": "self_attn", "value": [0.0, 1.0]}])
    r = parse_config(c)
    assert r.method.t == 0.0  # the recipe-level method takes the first value given
    r.tensor_params.layer_index = LayerIndex([f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)])
    assert r.tensor_params("model.layers.1.self_attn.q_proj.weight")["t"] == 1.0
    with pytest.raises(ConfigError, match="no filter matches"):
        r.tensor_params("model.embed_tokens.weight")
    with pytest.raises(ConfigError, match="tensor 'model.norm.weight'.*no filter matches"):
        r.check_tensors(["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"])


def test_della_per_tensor_epsilon_gradient():
    c = cfg("della", density=0.5, epsilon=[0.05, 0.25])
    r = parse_config(c)
    r.tensor_params.layer_index = LayerIndex([f"model.layers.{i}.x" for i in range(2)])
    assert r.tensor_params("model.layers.0.x")["epsilon"] == pytest.approx(0.1)
    assert r.tensor_params("model.layers.1.x")["epsilon"] == pytest.approx(0.5)


def test_bad_value_inside_gradient_names_the_key():
    with pytest.raises(ConfigError, match=r"parameters\.density.*density"):
        parse_config(cfg("ties", density=[0.5, 1.5]))
    c = cfg("ties")
    c["models"] = [model("e0", density=[{"filter": "mlp", "value": -0.1}, {"value": 0.5}])]
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.density"):
        parse_config(c)


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize(
    "config,match",
    [
        ({"models": [{"model": "a"}]}, "merge_method: missing"),
        (cfg("frobnicate"), "merge_method: unknown method 'frobnicate'"),
        (cfg("nuslerp_v2"), "merge_method: unknown method 'nuslerp_v2'"),
        (cfg("ties", densty=0.5), r"parameters\.densty: unknown parameter for 'ties'"),
        (cfg("ties", rank_scope="row"), "no mergekit equivalent"),
        (cfg("ties", lambda_=0.5), "spells it 'lambda'"),
        (cfg("ties", rescale=True), "parameters.rescale"),
        (cfg("ties", base=None), "base_model: 'ties' needs base_model"),
        (cfg("della", base=None), "base_model: 'della' needs base_model"),
        (cfg("slerp", models=["e1"]), r"parameters\.t: 'slerp' needs 't'"),
        (cfg("slerp", models=["e0", "e1"], t=0.5), "slerp interpolates base_model and one other"),
        (cfg("model_stock", models=["e0"]), "'model_stock' needs at least 2"),
        (cfg("ties", models=["base"]), "needs at least 1 model"),
        ({**cfg("ties"), "slices": [{"sources": []}]}, "either 'models:' or 'slices:'"),
        ({**cfg("ties"), "modules": {"text": {}}}, "modules: per-module merges"),
        ({**cfg("ties"), "dtype": "float8"}, "dtype: unknown dtype"),
        ({**cfg("ties"), "out_dtype": "int4"}, "out_dtype: unknown dtype"),
        ({**cfg("ties"), "tokenizer_source": "union"}, None),  # tokenizer forms: tests/test_mergekit_tokenizer.py
        ({**cfg("ties"), "tokenizer": {"source": "union"}}, None),
        ({**cfg("ties"), "tokenizer": {"source": "base", "tokens": {}}}, None),
        ({**cfg("ties"), "chat_template": "auto"}, None),
        ({**cfg("ties"), "normalise": True}, "normalise: unknown top-level key"),
        ({**cfg("ties"), "seed": "x"}, "seed: expected an integer"),
        ({**cfg("ties"), "models": []}, "models: missing or empty"),
        ({**cfg("ties"), "models": [{"model": "e0", "weight": 1}]}, r"models\[0\]: unknown key"),
        ({**cfg("ties"), "models": [{"model": "e0"}, {"model": "e0"}]}, "listed twice"),
        ({**cfg("ties"), "models": [{"model": "other+adapter"}]}, "only BASE\\+ADAPTER"),
        ({**cfg("ties"), "base_model": "base+adapter"}, "base_model: a 'model\\+adapter' base"),
        ({**cfg("ties"), "base_model": "org/model@rev"}, "hub revision"),
        (cfg("ties", density=[0.5, {"value": 1}]), r"parameters\.density: a list must hold only"),
        (cfg("ties", density=[{"filter": "a"}]), "needs 'value'"),
        (cfg("ties", density=None), r"parameters\.density: has no value"),
        (cfg("ties", density="lots"), r"parameters\.density: expected a number"),
        (cfg("ties", normalize="maybe"), r"parameters\.normalize: expected true or false"),
        (cfg("ties", density=0.0), "density"),
        (cfg("ties", weight=-1.0, density=0.5), None),  # refused by the engine, not the parser
    ],
)
def test_config_errors(config, match):
    if match is None:
        parse_config(config)
        return
    with pytest.raises(ConfigError, match=match):
        parse_config(config)


def test_parameters_mergekit_ignores_run_with_one_warning(caplog):
    """mergekit accepts and ignores a global parameter given per model, a parameter of another method
    (``gamma`` on ties, ``density`` left on linear, ``weight`` on slerp / model_stock): one warning."""
    plain = cfg("ties")
    plain["models"] = [model("e0")]
    c = cfg("ties")
    c["models"] = [model("e0", **{"lambda": 0.5})]
    assert_ignored(c, plain, caplog, "models[0].parameters.lambda (a global parameter of 'ties'")
    c["models"] = [model("e0", gamma=0.1)]
    assert_ignored(c, plain, caplog, "models[0].parameters.gamma")
    lin = {"merge_method": "linear", "models": [model("e0", weight=1.0), model("e1", weight=0.5)]}
    assert_ignored({**lin, "models": [model("e0", weight=1.0, density=0.5), model("e1", weight=0.5)]}, lin, caplog,
                   "models[0].parameters.density")
    sl = {"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.3},
          "models": [model("base"), model("e0")]}
    assert_ignored({**sl, "models": [model("base", weight=1.0), model("e0", weight=0.5)]}, sl, caplog,
                   "models[0].parameters.weight", "models[1].parameters.weight")
    ms = {"merge_method": "model_stock", "base_model": "base", "models": [model("e0"), model("e1")]}
    assert_ignored({**ms, "models": [model("e0", weight=1.0), model("e1", weight=1.0)]}, ms, caplog, "weight")
    c["models"] = [model("e0", densty=0.1)]
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.densty: unknown.*did you mean 'density'"):
        parse_config(c)


# ---------------------------------------------------------------------------- paths and adapters

def _adapter_dir(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return path


def test_base_plus_adapter(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    adapter = _adapter_dir(tmp_path / "lora")
    c = cfg("task_arithmetic", base=str(base), models=[f"{base}+{adapter}", "e1"])
    r = parse_config(c)
    assert r.experts == [str(adapter), "e1"] and r.base == str(base)
    c["models"] = [{"model": {"model": str(base), "lora": str(adapter)}}]
    assert parse_config(c).experts == [str(adapter)]
    # an adapter folder as the base model is refused
    with pytest.raises(ConfigError, match="base_model: .* is a PEFT adapter folder"):
        parse_config(cfg("ties", base=str(adapter)))
    # adapters in linear without a base
    with pytest.raises(ConfigError, match="adapter models need the base model"):
        parse_config(cfg("linear", base=None, models=[str(adapter), "e1"]))


def test_paths_relative_to_the_yaml_folder(tmp_path, monkeypatch):
    import yaml

    d = tmp_path / "cfgdir"
    (d / "models" / "base").mkdir(parents=True)
    (d / "models" / "e0").mkdir(parents=True)
    path = d / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg("ties", base="models/base", models=["models/e0", "missing"])))
    monkeypatch.chdir(tmp_path)
    r = parse_config(path)
    assert r.base == str(d / "models" / "base")
    assert r.experts == [str(d / "models" / "e0"), "missing"]
    assert r.source == str(path)


def test_yaml_loading_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [ties\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_config(bad)
    multi = tmp_path / "multi.yaml"
    multi.write_text("merge_method: ties\n---\nmerge_method: linear\n")
    with pytest.raises(ConfigError, match="2 documents"):
        parse_config(multi)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n")
    with pytest.raises(ConfigError, match="a list"):
        parse_config(lst)


def test_yaml_scientific_strings_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("merge_method: della\nbase_model: b\nmodels:\n  - model: e\n"
                    "parameters:\n  density: 0.5\n  epsilon: 5e-2\n  lambda: 1e0\n")
    r = parse_config(path)
    assert math.isclose(r.method.epsilon, 0.1) and r.method.lambda_ == 1.0


def test_lightning_merge_dialect_reads_our_own_fields():
    """``dialect: lightning_merge`` makes a mergekit name mean our class, with its fields and defaults."""
    from lightning_merge.methods import Ties

    c = cfg("ties", density=0.3, trim_rule="official", election="unweighted")
    with pytest.raises(ConfigError, match="trim_rule.*no mergekit equivalent"):
        parse_config(c)
    r = parse_config({**c, "dialect": "lightning_merge"})
    assert r.method == Ties(density=0.3, trim_rule="official", election="unweighted")
    assert parse_config({**cfg("ties"), "dialect": "lightning_merge"}).method == Ties()  # our defaults
    with pytest.raises(ConfigError, match="dialect: 'lm' is not one of"):
        parse_config({**c, "dialect": "lm"})
