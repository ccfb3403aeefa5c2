"""Run mergekit's example and test configurations through mergekit 0.1.5 and ours; write the report.

``python tests/conformance_report.py [OUT.md]`` (mergekit installed) runs every case of
tests/test_conformance_mergekit.py (which defines the cases, the tiny models they run on, the checks
of mergekit's own tests and the expected outcomes) and writes docs/mergekit_conformance.md. A case
is a YAML of ``tests/data/mergekit_conformance/`` with its model names mapped to local folders, run
through mergekit 0.1.5 (``run_merge(MergeConfiguration.model_validate(cfg))``, ``random_seed=0``)
and through the real command, ``lightning-merge merge CASE.yml OUT --seed 0``
(``lightning_merge.cli.main``, in process). ``CASE@v5-names`` runs CASE on the ``NAME@v5-names``
models where there are such.

Comparison (:func:`compare`): the same tensor names, shapes and dtypes; the same
``num_hidden_layers``/``n_layer``/``vocab_size`` in config.json (top level and ``text_config``);
the same vocabulary (token → id, tokenizer.json) and chat template. Values:

* deterministic methods: ``torch.testing.assert_close`` per tensor, (rtol, atol) = (1e-5, 1e-6)
  for float32 outputs, one unit in the last place for half ones (rtol 2⁻⁷ bfloat16, 2⁻¹⁰ float16,
  atol 1e-6). We compute in float32 whatever ``dtype`` says, mergekit in ``dtype``, so the
  reference is mergekit with ``dtype: float32, out_dtype: <the YAML's dtype>`` (what our docs
  promise); the report adds the largest difference to mergekit run as written;
* DARE/DELLA (random masks, different generators): δ = output − base (base cast to the output
  dtype) pooled over all tensors: the fraction of δ ≠ 0 within 5·sqrt(2p(1−p)/n), the mean within
  5·sqrt(2)·std/sqrt(n), the std within 3 % (seeds 0-4 of either tool spread by about 1 %).

Checks (:func:`check`), on mergekit's output and on ours: no NaN; the folder loads with
transformers with no missing weight (mergekit's tests check every weight of the architecture is
there); and the assertions of the case's own mergekit test (``want``, from the test module's
``CHECKS``).

Outcomes (:func:`run_case`): ``agree``; ``differ``; ``refused`` (we stop with a ConfigError, exit
2); ``bug`` (we stop with an internal error, exit 1); ``mergekit_crash`` (mergekit raises on a
config its test treats as valid, ours passes the checks); ``mergekit_wrong`` (mergekit's output
fails a check, ours passes). A case that mergekit's test expects to fail agrees when both refuse it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger("conformance_report")

CASES_DIR = Path(__file__).resolve().parent / "data" / "mergekit_conformance"
VARIANT = "@v5-names"

# ---------------------------------------------------------------------------------------------- running
def load_case(case: str) -> dict[str, Any]:
    return yaml.safe_load((CASES_DIR / f"{case.partition('@')[0]}.yml").read_text())


def _rewrite(cfg: Any, fn: Any) -> Any:
    """``cfg`` with ``fn`` applied to every model reference (base_model, models, slices, tokenizer)."""
    cfg = copy.deepcopy(cfg)
    for e in (cfg.get("models") or []) + [src for s in cfg.get("slices") or [] for src in s.get("sources", [])]:
        e["model"] = fn(e["model"])
    if cfg.get("base_model"):
        cfg["base_model"] = fn(cfg["base_model"])
    if cfg.get("tokenizer_source") not in (None, "base", "union"):
        cfg["tokenizer_source"] = fn(cfg["tokenizer_source"])
    tok = cfg.get("tokenizer") or {}
    if tok.get("source") not in (None, "base", "union"):
        tok["source"] = fn(tok["source"])
    for spec in (tok.get("tokens") or {}).values():
        src = spec.get("source")
        if isinstance(src, str) and src not in ("base", "union"):
            spec["source"] = fn(src)
        elif isinstance(src, dict) and "model" in src:
            src["model"] = fn(src["model"])
    return cfg


def run_mergekit(cfg: dict[str, Any], out: Path, seed: int = 0) -> str | None:
    """Run mergekit 0.1.5; returns None, or the exception it raised as one line."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    shutil.rmtree(out, ignore_errors=True)
    try:
        options = MergeOptions(device="cpu", quiet=True, write_model_card=False, random_seed=seed)
        run_merge(MergeConfiguration.model_validate(cfg), str(out), options=options)
    except Exception as e:  # noqa: BLE001 - any mergekit failure is an outcome here
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


def run_ours(cfg: dict[str, Any], out: Path, seed: int = 0) -> tuple[int, str]:
    """``lightning-merge merge`` on ``cfg`` (written next to ``out``); returns (exit status, stderr)."""
    from lightning_merge.cli import main

    path = out.with_suffix(".yml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = ["merge", str(path), str(out), "--seed", str(seed), "--no-progress"]
    shutil.rmtree(out, ignore_errors=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    text = err.getvalue().strip()
    if rc == 1:  # an internal error: keep the end of its traceback for the report
        os.environ["LIGHTNING_MERGE_TRACEBACK"] = "1"
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        except Exception:  # noqa: BLE001
            text += "\n" + "".join(traceback.format_exc().splitlines(keepends=True)[-8:])
        finally:
            del os.environ["LIGHTNING_MERGE_TRACEBACK"]
    return rc, text


# ---------------------------------------------------------------------------------------------- comparing
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
_HALF_RTOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def config_sizes(folder: Path) -> dict[str, Any]:
    """num_hidden_layers / n_layer / vocab_size of config.json, top level and text_config."""
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("num_hidden_layers", "n_layer", "vocab_size")
    out = {k: cfg[k] for k in keys if k in cfg}
    out.update({f"text_config.{k}": v for k, v in (cfg.get("text_config") or {}).items() if k in keys})
    return out


def vocabulary(folder: Path) -> dict[str, int] | None:
    """token -> id of the saved tokenizer.json (model vocabulary and added tokens); None without one."""
    f = folder / "tokenizer.json"
    if not f.exists():
        return None
    tj = json.loads(f.read_text())
    return {**(tj["model"].get("vocab") or {}), **{t["content"]: t["id"] for t in tj.get("added_tokens", [])}}


def chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    tc = folder / "tokenizer_config.json"
    return json.loads(tc.read_text()).get("chat_template") if tc.exists() else None


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float | None:
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return None
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def pooled_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[int, float, float, float]:
    """(n, fraction of δ != 0, mean δ, std δ), δ = merged − base cast to merged's dtype, all tensors pooled."""
    d = torch.cat([(v.double() - base[k].to(v.dtype).double()).flatten() for k, v in sorted(merged.items())])
    return d.numel(), float((d != 0).double().mean()), float(d.mean()), float(d.std())


def compare(cfg: dict[str, Any], ref_dir: Path, our_dir: Path) -> str | None:
    """None when our output matches mergekit's (see the module docstring), else what differs."""
    ref, ours = load_tensors(ref_dir), load_tensors(our_dir)
    if set(ref) != set(ours):
        only_ref, only_ours = sorted(set(ref) - set(ours))[:3], sorted(set(ours) - set(ref))[:3]
        return f"tensor names: only mergekit has {only_ref}, only ours {only_ours}"
    for k, r in ref.items():
        if ours[k].shape != r.shape or ours[k].dtype != r.dtype:
            return f"{k}: mergekit {tuple(r.shape)} {r.dtype}, ours {tuple(ours[k].shape)} {ours[k].dtype}"
    for what, fn in (("config.json", config_sizes), ("vocabulary", vocabulary), ("chat template", chat_template)):
        if fn(ref_dir) != fn(our_dir):
            return f"{what}: mergekit {str(fn(ref_dir))[:200]}, ours {str(fn(our_dir))[:200]}"
    if cfg["merge_method"] in RANDOM_METHODS:
        base = load_tensors(Path(cfg["base_model"]))
        (n, fr, mr, sr), (_, fo, mo, so) = pooled_stats(ref, base), pooled_stats(ours, base)
        if abs(fo - fr) > 5 * (2 * fr * (1 - fr) / n) ** 0.5 or abs(mo - mr) > 5 * 2**0.5 * sr / n**0.5 \
                or abs(so / sr - 1) > 0.03:
            return f"δ statistics (n, kept, mean, std): mergekit {(n, fr, mr, sr)}, ours {(fo, mo, so)}"
        return None
    for k, r in ref.items():
        try:
            torch.testing.assert_close(ours[k], r, rtol=_HALF_RTOL.get(r.dtype, 1e-5), atol=1e-6)
        except AssertionError as e:
            return f"{k}: {' '.join(str(e).split())[:300]}"
    return None


def _missing_weights(out: Path) -> list[str]:
    """The weights transformers reports missing when it loads ``out``."""
    import transformers as tf

    llava = json.loads((out / "config.json").read_text()).get("model_type") == "llava"
    cls = tf.LlavaForConditionalGeneration if llava else tf.AutoModelForCausalLM
    tf.logging.set_verbosity_error()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, info = cls.from_pretrained(out, output_loading_info=True)
    return sorted(info["missing_keys"])


def check(want: dict[str, Any], out: Path, models: dict[str, Path]) -> str | None:
    """No NaN, loads without missing weights, and mergekit's test assertions ``want`` (see the test
    module's ``CHECKS``; ``models``: name -> folder, for ``rows_from``)."""
    sizes, vocab, tensors = config_sizes(out), vocabulary(out) or {}, load_tensors(out)
    embed = next((v for k, v in tensors.items() if k.endswith("embed_tokens.weight")), None)
    problems = [f"NaN in {k}" for k, v in tensors.items() if v.isnan().any()][:1]
    missing = _missing_weights(out)
    if missing:
        problems.append(f"transformers finds {len(missing)} of the model's weights missing, e.g. {missing[0]}")
    if "layers" in want and want["layers"] not in sizes.values():
        problems.append(f"{want['layers']} layers expected, config.json has {sizes}")
    if "zero" in want:
        hit = [k for k in tensors if want["zero"] in k]
        if not hit or any(tensors[k].count_nonzero() for k in hit):
            problems.append(f"every '{want['zero']}' tensor should be 0")
        if any(tensors[k].count_nonzero() == 0 for k in tensors if want["nonzero"] in k):
            problems.append(f"'{want['nonzero']}' should not be 0")
    if "vocab" in want and len(vocab) != want["vocab"]:
        problems.append(f"tokenizer of {want['vocab']} tokens expected, got {len(vocab)}")
    if "added" in want:
        added = len(json.loads((out / "tokenizer.json").read_text()).get("added_tokens", []))
        if added != want["added"]:
            problems.append(f"{want['added']} added tokens expected, got {added}")
    problems += [f"token {t!r} missing" for t in want.get("has", []) if t not in vocab]
    problems += [f"token {t!r} should be absent" for t in want.get("lacks", []) if t in vocab]
    if "vocab_size" in want and sizes.get("vocab_size") != want["vocab_size"]:
        problems.append(f"config.json vocab_size {want['vocab_size']} expected, got {sizes.get('vocab_size')}")
    if "rows" in want and (embed is None or embed.shape[0] != want["rows"]):
        problems.append(f"{want['rows']} embedding rows expected")
    for token, src in want.get("rows_from", {}).items():
        name, row = src if isinstance(src, tuple) else (src, vocabulary(models[src])[token])
        expected = load_tensors(models[name])["model.embed_tokens.weight"][row]
        if token not in vocab or embed is None or not torch.allclose(embed[vocab[token]].float(), expected,
                                                                     atol=1e-3, rtol=1e-4):
            problems.append(f"the embedding of {token!r} should be {name}'s row {row}")
    if "template_has" in want and want["template_has"] not in (chat_template(out) or ""):
        problems.append(f"chat template should contain {want['template_has']!r}")
    return "; ".join(problems) or None


# ---------------------------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    """One case's result: ``kind`` (see the module docstring), a one-line ``detail``, and the largest
    |ours − mergekit| against the float32-compute reference and against mergekit as written."""

    case: str
    kind: str
    detail: str = ""
    max_diff: float | None = None
    as_written: float | None = None


def run_case(case: str, models: dict[str, Path], work: Path, want: dict[str, Any] | None = None,
             as_written: bool = False) -> Outcome:
    """Run ``case`` through both tools under ``work`` and classify it. ``models``: model name ->
    folder; ``want``: the checks of the case's mergekit test; ``as_written``: also run mergekit in
    the YAML's own ``dtype`` (for the report's second number)."""
    want = want or {}
    variant = case.partition("@")[2]
    cfg = _rewrite(load_case(case), lambda n: str(models.get(f"{n}@{variant}", models[n])))
    work.mkdir(parents=True, exist_ok=True)
    ref_dir, our_dir = work / "mergekit", work / "ours"
    ref_cfg = cfg
    if cfg.get("dtype") not in (None, "float32"):
        ref_cfg = {**cfg, "dtype": "float32", "out_dtype": cfg.get("out_dtype", cfg["dtype"])}
    ref_err = run_mergekit(ref_cfg, ref_dir)
    rc, err = run_ours(cfg, our_dir)
    ours_msg = err.splitlines()[-1] if rc == 2 and err else err
    if want.get("error"):  # mergekit's test expects this config to fail
        if ref_err is None:
            return Outcome(case, "mergekit_wrong", "mergekit's test expects an error, it merges")
        return Outcome(case, {2: "agree", 0: "differ"}.get(rc, "bug"),
                       f"both refuse. mergekit: {ref_err}; ours: {ours_msg or 'merges'}")
    if rc == 2:
        return Outcome(case, "refused", ours_msg.removeprefix("lightning-merge: error: "))
    if rc != 0:
        return Outcome(case, "bug", ours_msg)
    ours_check = check(want, our_dir, models)
    if ref_err is not None:
        if ours_check is None:
            return Outcome(case, "mergekit_crash", f"mergekit: {ref_err}")
        return Outcome(case, "differ", f"mergekit: {ref_err}; ours fails a check: {ours_check}")
    mk_check, diff = check(want, ref_dir, models), compare(cfg, ref_dir, our_dir)
    ours, ref = load_tensors(our_dir), load_tensors(ref_dir)
    out = Outcome(case, "agree", max_diff=max_abs_diff(ours, ref))
    if as_written and ref_cfg is not cfg and run_mergekit(cfg, work / "mergekit_as_written") is None:
        out.as_written = max_abs_diff(ours, load_tensors(work / "mergekit_as_written"))
    if ours_check is not None:
        out.kind, out.detail = "differ", f"ours fails a check: {ours_check}" + (
            f" (mergekit too: {mk_check})" if mk_check else "")
    elif mk_check is not None:
        out.kind, out.detail = "mergekit_wrong", f"mergekit's output fails a check: {mk_check}"
    elif diff is not None:
        out.kind, out.detail = "differ", diff
    elif cfg["merge_method"] in RANDOM_METHODS:
        base = load_tensors(Path(cfg["base_model"]))
        (_, fr, _, sr), (_, fo, _, so) = pooled_stats(ref, base), pooled_stats(ours, base)
        out.detail = f"random masks: δ ≠ 0 for {fo:.4f} vs {fr:.4f}, std δ {so:.4g} vs {sr:.4g}"
        out.max_diff = out.as_written = None
    return out


def describe(case: str) -> str:
    """The case's method and the config forms it uses, e.g. ``ties; gradients, filters``."""
    cfg = load_case(case)
    forms: list[str] = [f"slices ({len(cfg['slices'])}, layer_range)"] if cfg.get("slices") else []

    def kinds(v: Any) -> None:
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            forms.append("filters")
            for x in v:
                kinds(x.get("value"))
        elif isinstance(v, list):
            forms.append("gradients")

    for s in [cfg.get("parameters") or {}] + [m.get("parameters") or {} for m in cfg.get("models") or []]:
        for v in s.values():
            kinds(v)
    forms += [k for k in ("tokenizer_source", "tokenizer", "chat_template") if cfg.get(k) is not None]
    forms += ["LLaVA weights under transformers 5 names"] if case.endswith(VARIANT) else []
    return cfg["merge_method"] + (f"; {', '.join(dict.fromkeys(forms))}" if forms else "")


# ---------------------------------------------------------------------------------------------- report
_LABEL = {"refused": "refused", "bug": "bug in lightning_merge", "differ": "differ",
          "mergekit_crash": "mergekit fails", "mergekit_wrong": "mergekit bug (wrong output)"}


def result_text(o: Outcome) -> str:
    """The report's result cell for an ``agree`` outcome."""
    if o.max_diff is None:
        return f"agree ({o.detail})" if o.detail else "agree"
    text = f"agree (max abs diff {o.max_diff:.3g}"
    if o.as_written is not None:
        text += f"; {o.as_written:.3g} to mergekit computing in the YAML's dtype"
    return text + (f"; {o.detail}" if o.detail else "") + ")"


def write_report(outcomes: list[Outcome], expected: dict[str, tuple[str, str]], path: Path) -> None:
    """One row per case; the reasons of the other outcomes (EXPECTED's, else the detail) as numbered notes."""
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("agree", *_LABEL)}
    notes: dict[str, int] = {}
    rows = []
    for o in outcomes:
        if o.kind == "agree":
            cell = result_text(o)
        else:
            reason = expected[o.case][1] if expected.get(o.case, ("",))[0] == o.kind else o.detail
            cell = f"{_LABEL[o.kind]} [{notes.setdefault(reason, len(notes) + 1)}]"
        rows.append(f"| `{o.case}` | {describe(o.case)} | {cell.replace('|', chr(92) + '|')} |")
    lines = [
        "# mergekit conformance: its examples and test configurations through both tools",
        "",
        "Written by `python tests/conformance_report.py`; tests/test_conformance_mergekit.py (slow, parity) "
        "asserts the same outcomes. Each case of tests/data/mergekit_conformance/ (origins and licence in its "
        "README.md) runs on tiny local models through mergekit 0.1.5 and through `lightning-merge merge`; "
        "the docstring of tests/conformance_report.py says which models and how outputs are compared. "
        "\"max abs diff\" is to mergekit computing in float32 (as we do), the second number to mergekit "
        "run as written (bfloat16/float16 arithmetic). `@v5-names`: the LLaVA case again, its weights "
        "renamed to transformers 5's names.",
        "",
        f"{len(outcomes)} cases: " + ", ".join(f"{n} {_LABEL.get(k, k)}" for k, n in counts.items() if n) + ".",
        "",
        "| case | method / form | result |",
        "|---|---|---|",
        *rows,
        "",
        *[f"{n}. {reason}" for reason, n in notes.items()],
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run every case and write docs/mergekit_conformance.md (or the path given)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    from test_conformance_mergekit import CASES, CHECKS, EXPECTED, build_models

    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "docs" / "mergekit_conformance.md"
    with tempfile.TemporaryDirectory() as d:
        models = build_models(Path(d) / "models")
        outcomes = [run_case(c, models, Path(d) / c, CHECKS.get(c.partition("@")[0]), as_written=True)
                    for c in CASES]
    write_report(outcomes, EXPECTED, path)
    for o in outcomes:
        want = EXPECTED.get(o.case, ("agree", ""))[0]
        log.info("%-15s %s%s", o.kind, o.case, "" if o.kind == want else f"  (EXPECTED says {want}: update it)")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
