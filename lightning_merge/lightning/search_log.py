"""The per-candidate record of a merge search: logger rows and the CSV file."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

__all__ = ["log_rows", "write_csv"]


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def log_rows(loggers: Sequence[Logger], results: Sequence[dict[str, Any]], score_name: str) -> None:
    """One ``log_metrics`` call per candidate (``step`` = its index): the score and the index."""
    for logger in loggers:
        for r in results:
            logger.log_metrics({f"merge_search/{score_name}": r["score"],
                                "merge_search/candidate": float(r["index"])}, step=r["index"])
        logger.save()


def write_csv(path: Path, results: Sequence[dict[str, Any]], score_name: str, best_index: int | None) -> None:
    """Write one row per candidate, atomically (a temporary file, then a rename).

    Columns: ``index``, ``origin`` (candidates / grid / random / alpha_top / alpha_band), ``method``,
    every hyperparameter any candidate sets (blank where a candidate does not), ``weights`` (JSON),
    any extra metric recorded with the score, the score (named ``score_name``) and ``best`` (0/1).
    """
    cands = [r["candidate"] for r in results]
    params = list(dict.fromkeys(k for c in cands for k in c if k not in ("method", "weights")))
    extra = list(dict.fromkeys(k for r in results for k in r.get("metrics", {}) if k != score_name))
    fields = ["index", "origin", "method", *params, "weights", *extra, score_name, "best"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in results:
            c = r["candidate"]
            metrics = r.get("metrics", {})
            w.writerow({"index": r["index"], "origin": r.get("origin", ""), "method": c["method"],
                        **{p: _cell(c[p]) if p in c else "" for p in params},
                        "weights": _cell(c["weights"]) if "weights" in c else "",
                        **{m: metrics.get(m, "") for m in extra},
                        score_name: r["score"], "best": int(r["index"] == best_index)})
    os.replace(tmp, path)
