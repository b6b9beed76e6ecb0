"""Tables for the terminal, and csv/json with one shape per field, of the frames tracked_ckpt.views builds."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import pandas as pd


def _emit_frame(df: pd.DataFrame, fmt: str) -> None:
    """csv or json with one shape per field: ISO 8601 UTC times (microseconds), floats as repr (exact)."""
    if fmt == "csv":
        out = df.copy()
        for col in out.columns:
            if str(out[col].dtype).startswith("datetime64"):
                out[col] = out[col].map(_json_value)
        click.echo(out.to_csv(index=False), nl=False)
    else:
        records = [{k: _json_value(v) for k, v in row.items()} for row in df.to_dict("records")]
        click.echo(json.dumps(records, indent=1))


def _json_value(v: Any) -> Any:
    """A cell as JSON: None for NA/NaN/inf, ISO 8601 for a time, Python int/float/bool/str otherwise."""
    import pandas as pd

    if isinstance(v, (list, dict, tuple)):
        return v
    if _is_na(v):
        return None
    if isinstance(v, pd.Timestamp):
        return iso_utc(v)
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def iso_utc(ts: pd.Timestamp) -> str:
    """``2026-11-29T21:37:16.123456Z``: the one timestamp format of the CLI's csv and json output."""
    return str(ts.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


_FIRST_COLUMNS = {"samples": 0, "tokens": 1, "reward": 2}  # how far into the data, then the usual monitor


def _checkpoints_table(df: pd.DataFrame, *, with_run: bool) -> str:
    from ..views import CHECKPOINT_COLUMNS

    metrics = [c for c in df.columns if c not in CHECKPOINT_COLUMNS]
    metrics.sort(key=lambda c: (_FIRST_COLUMNS.get(c, len(_FIRST_COLUMNS)), c))
    headers = (["run"] if with_run else []) + ["step", "epoch", *metrics, "size", "age", "mark", "path"]
    rows = []
    for row in df.to_dict("records"):  # not itertuples: it renames metric columns like "val/loss"
        cells = [row["run_id"]] if with_run else []
        cells += [_int(row["step"]), _int(row["epoch"])]
        cells += [_num(row[m]) for m in metrics]
        marks = [name for name, flag in (("latest", row["is_latest"]), ("best", row["is_best"])) if flag]
        cells += [_size(row["size_bytes"]), _age(row["created"]), ",".join(marks), row["path"]]
        rows.append(cells)
    return _table(headers, rows, left={"run", "mark", "path"})


def _runs_table(df: pd.DataFrame, tree: bool = False) -> str:
    headers = ["run", "name", "status", "ckpts", "latest", "best", "size", "started", "forked from"]
    rows = []
    for r in df.itertuples(index=False):
        metric = str(r.monitor).rpartition(":")[0] if isinstance(r.monitor, str) else "best"
        best = "-" if math.isnan(r.best_value) else f"{metric}={_num(r.best_value)} @{_int(r.best_step)}"
        counts = [_int(r.checkpoints), _int(r.latest_step), best, _size(r.size_bytes), _age(r.start_time)]
        parent = "-" if _is_na(r.forked_from) else f"{_parent_run(r.forked_from)} @{_int(r.fork_step)}"
        depth = int(getattr(r, "depth", 0)) if tree else 0
        run = ("   " * (depth - 1) + "└─ " if depth else "") + r.run_id
        rows.append([run, _str(r.run_name), _str(r.status), *counts, parent])
    return _table(headers, rows, left={"run", "name", "status", "best", "forked from"})


def _parent_run(ref: str) -> str:
    from ..refs import run_of

    return run_of(ref)


def _tree_order(df: pd.DataFrame) -> pd.DataFrame:
    """Runs in lineage order: each root (newest first), then its forks depth-first, with a ``depth`` column."""
    ids = set(df["run_id"])
    children: dict[str, list[int]] = {}
    roots = []
    for i, ref in enumerate(df["forked_from"]):
        parent = None if _is_na(ref) else _parent_run(str(ref))
        if parent in ids:
            children.setdefault(str(parent), []).append(i)
        else:
            roots.append(i)  # a run, or a fork whose parent is not listed (another experiment, deleted)
    order: list[tuple[int, int]] = []

    def visit(i: int, depth: int) -> None:
        order.append((i, depth))
        for c in children.get(str(df["run_id"].iloc[i]), []):
            visit(c, depth + 1)

    for i in roots:
        visit(i, 0)
    out = df.iloc[[i for i, _ in order]].copy()
    out["depth"] = [d for _, d in order]
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: set[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, headers, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _is_na(v: Any) -> bool:
    import pandas as pd

    return v is None or bool(pd.isna(v))


def _int(v: Any) -> str:
    return "-" if _is_na(v) else str(int(v))


def _str(v: Any) -> str:
    return "-" if _is_na(v) else str(v)


def _num(v: Any) -> str:
    return "-" if _is_na(v) else f"{float(v):.6g}"


def _size(v: Any) -> str:
    from ..progress import human_bytes

    return "-" if _is_na(v) else human_bytes(int(v))


def _age(ts: Any) -> str:
    if _is_na(ts):
        return "-"
    seconds = max(time.time() - ts.timestamp(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
