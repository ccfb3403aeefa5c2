"""Write this folder's cases from a clone of github.com/arcee-ai/mergekit (run by hand, once).

``python extract_cases.py PATH/TO/mergekit.git``: ``examples/*.yml`` are copied verbatim; the
``MergeConfiguration`` objects of ``tests/test_basic_merges.py``, ``tests/test_tokenizer.py`` and
``tests/test_chat_template.py`` are transcribed below by hand from that commit's code.
"""

import subprocess
import sys
from pathlib import Path

import yaml

GIT = sys.argv[1]
REV = "a6e402884ba9bc30da7f23e8304a35f19485de95"
OUT = Path(__file__).resolve().parent


def header(path, what):
    return (
        f"# origin: github.com/arcee-ai/mergekit @ {REV[:12]}, {path}{what}\n"
        "# licence: LGPL-3.0 (mergekit); see README.md in this folder\n"
    )


for ex in ["arcee_fusion", "bio-merge", "gradient-slerp", "linear", "orcamini-platy-44layer", "ties"]:
    text = subprocess.run(
        ["git", f"--git-dir={GIT}", "show", f"{REV}:examples/{ex}.yml"], check=True, capture_output=True, text=True
    ).stdout
    (OUT / f"examples__{ex}.yml").write_text(header(f"examples/{ex}.yml", " (verbatim)") + text)


def M(model, **params):
    return {"model": model, "parameters": params} if params else {"model": model}


cases = {}
BM = "tests/test_basic_merges.py"


def two(a, b, method, base=None, params=None, dtype="bfloat16"):
    c = {"merge_method": method}
    if base is not None:
        c["base_model"] = base
    c["models"] = [M(a, weight=0.6), M(b, weight=0.4)]
    c["dtype"] = dtype
    if params is not None:
        c["parameters"] = params
    return c


def add(file, test, cfg, variant=""):
    stem = Path(file).stem
    name = f"tests__{stem}__{test}" + (f"__{variant}" if variant else "")
    where = f"{file}::{test}" + (f" ({variant})" if variant else "")
    cases[name] = (where, cfg)


# TestGraniteMerges
add(BM, "test_granite_copy", {"merge_method": "passthrough", "models": [M("granite_a")], "dtype": "bfloat16"})
add(
    BM,
    "test_granite_linear_merge",
    {"merge_method": "linear", "models": [M("granite_a", weight=0.6), M("granite_b", weight=0.4)], "dtype": "bfloat16"},
)
add(
    BM,
    "test_granite_slerp",
    {
        "merge_method": "slerp",
        "base_model": "granite_a",
        "models": [M("granite_a"), M("granite_b")],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
    },
)
# TestBasicMerges
add(BM, "test_gpt2_copy", {"merge_method": "passthrough", "models": [M("gpt2_like")], "dtype": "bfloat16"})
add(
    BM,
    "test_gpt2_stack",
    {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "gpt2_like", "layer_range": [0, 12]}]} for _ in range(2)],
        "dtype": "bfloat16",
    },
)
add(
    BM,
    "test_passthrough_scale",
    {"merge_method": "passthrough", "models": [M("model_a", scale=[{"filter": "o_proj", "value": 0}, {"value": 1}])]},
)

for vlm in ("", "VLM_"):
    a, b, c = ("vlm_a", "vlm_b", "vlm_c") if vlm else ("model_a", "model_b", "model_c")
    add(BM, f"test_linear_{vlm}merge", two(a, b, "linear"))
    add(BM, f"test_slerp_{vlm}merge", two(a, b, "slerp", base=a, params={"t": 0.35}))
    for base in (None, c):
        for rw in (False, True):
            for fl in (False, True):
                add(
                    BM,
                    f"test_nuslerp_{vlm}merges",
                    two(a, b, "nuslerp", base=base, params={"nuslerp_row_wise": rw, "nuslerp_flatten": fl}),
                    f"base-{'none' if base is None else base}_row-wise-{str(rw).lower()}_flatten-{str(fl).lower()}",
                )
    z = two(a, b, "nuslerp", base=c, params={"nuslerp_row_wise": False, "nuslerp_flatten": False})
    z["models"][0]["parameters"]["weight"] = -0.5
    z["models"][1]["parameters"]["weight"] = 0.5
    add(BM, f"test_nuslerp_{vlm}merges", z, "weights-sum-to-zero")
    add(BM, f"test_task_arithmetic_{vlm}merge", two(a, b, "task_arithmetic", base=c))
    add(BM, f"test_breadcrumbs_{vlm}merge", two(a, b, "breadcrumbs", base=c))
    add(BM, f"test_ties_{vlm}merge", two(a, b, "ties", base=c, params={"density": 0.3}))
    if not vlm:
        add(BM, "test_sce_merge", two(a, b, "sce", base=c, params={"select_topk": 0.5}))
        add(BM, "test_ram_merge", two(a, b, "ram", base=c))
        add(BM, "test_ramplus_tl_merge", two(a, b, "ramplus_tl", base=c, params={"r": 0.05, "alpha": 1.0}))
        add(BM, "test_multislerp_merge", two(a, b, "multislerp", base=c))
    add(BM, f"test_dare_ties_{vlm}merge", two(a, b, "dare_ties", base=c, params={"density": 0.66}))
    add(BM, f"test_model_stock_{vlm}merge", two(b, c, "model_stock", base=a))
    add(BM, f"test_model_stock_filterwise_{vlm}merge", two(b, c, "model_stock", base=a, params={"filter_wise": True}))
    if not vlm:
        add(BM, "test_arcee_fusion_merge", two(a, b, "arcee_fusion", base=a))
        add(BM, "test_nearswap_merge", two(a, b, "nearswap", base=a, params={"t": 0.0001}))
        add(
            BM, "test_della_merge", two(a, b, "della", base=c, params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5})
        )
        add(
            BM,
            "test_della_invalid_epsilon",
            two(a, b, "della", base=c, params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
        )
        add(BM, "test_karcher_merge", two(a, b, "karcher", base=c, params={"max_iter": 5, "tol": 1e-5}))

TK = "tests/test_tokenizer.py"


def tok(models, base=None, method="linear", source=None, t=None, tokenizer=None):
    c = {"merge_method": method}
    if base is not None:
        c["base_model"] = base
    c["models"] = [M(m, weight=1.0) for m in models]
    c["dtype"] = "float32"
    if source is not None:
        c["tokenizer_source"] = source
    c["parameters"] = {"t": t} if t is not None else {}
    if tokenizer is not None:
        c["tokenizer"] = tokenizer
    return c


THREE = ["model_base", "model_padded", "model_chatml"]
add(TK, "test_legacy_mode", tok(THREE, base="model_base"))
add(TK, "test_source_base", tok(THREE, base="model_base", source="base"))
add(TK, "test_source_union", tok(THREE, base="model_base", source="union"))
add(TK, "test_source_model", tok(THREE, base="model_base", source="model_chatml"))
add(
    TK,
    "test_slerp_union",
    tok(["model_base", "model_chatml"], base="model_base", source="union", method="slerp", t=0.5),
)
add(
    TK,
    "test_force_token",
    tok(
        ["model_base", "model_chatml"],
        base="model_base",
        tokenizer={
            "source": "union",
            "tokens": {
                "_tok_10": {"source": "model_chatml", "force": True},
                "_tok_11": {"source": "model_base", "force": True},
            },
        },
    ),
)
add(
    TK,
    "test_model_token_id",
    tok(
        ["model_base", "model_chatml"],
        base="model_base",
        tokenizer={
            "source": "base",
            "tokens": {
                "_tok_20": {"source": {"kind": "model_token", "model": "model_chatml", "token_id": 64}, "force": True},
                "_tok_21": {"source": {"kind": "model_token", "model": "model_base", "token": "<s>"}, "force": True},
            },
        },
    ),
)
add(
    TK,
    "test_pad_to_multiple_of",
    tok(["model_chatml"], base="model_chatml", tokenizer={"source": "base", "pad_to_multiple_of": 16}),
)

CT = "tests/test_chat_template.py"
for test, tmpl in (("test_template_chatml", "chatml"), ("test_template_literal_jinja", "{{messages[0]['content']}}")):
    add(
        CT,
        test,
        {
            "merge_method": "linear",
            "models": [M("model_base", weight=0.5), M("model_b", weight=0.5)],
            "base_model": "model_base",
            "dtype": "bfloat16",
            "chat_template": tmpl,
        },
    )

for name, (where, cfg) in cases.items():
    body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)
    (OUT / f"{name}.yml").write_text(header(where, " (the MergeConfiguration the test builds, as YAML)") + body)
print(f"{len(cases) + 6} cases written to {OUT}")
