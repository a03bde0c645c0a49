"""``fvlm compare OUTPUT_DIR...``: one table of several runs (accuracy against cost).

Reads each folder's ``summary.json`` (written by ``fvlm run``, or by the lmms-eval model with
``output=``), and the task metrics of lmms-eval results files below the folder (lmms-eval's
``--output_path`` pointed there), and prints one row per run: selector, its arguments, position
policy, accuracy (fvlm's quick scorer) or lmms-eval's metrics (one column per ``task/metric``),
layer-average visual tokens, KV cache, prefill and decode time, the prefill speedup against a
reference run (``--reference``, else the first unpruned run given) and the paired speedup a run
measured itself (runs with fidelity time the unpruned model on the same batches, next to the pruned
one: the fairer figure on a busy machine). ``--csv`` / ``--markdown`` write the table, ``--plot``
draws accuracy (or ``--metric``) against layer-average visual tokens.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from fvlm.commands.exit_codes import ExitCode
from fvlm.errors import UsageError

COLUMNS = ("run", "selector", "args", "positions", "samples", "accuracy", "layer_average", "llm_input_visual",
           "kv_mib", "prefill_ms", "decode_ms_per_token", "speedup", "paired_speedup")
HELP = "compare finished runs: accuracy, visual tokens, KV cache, latency and speedup in one table"


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help=HELP, description=HELP)
    p.add_argument("runs", nargs="+", type=Path, metavar="OUTPUT_DIR",
                   help="output folders of runs (each holds a summary.json), or summary.json files")
    p.add_argument("--reference", type=Path, default=None,
                   help="the run speedups are measured against (default: the first unpruned run given)")
    p.add_argument("--csv", type=Path, default=None, help="write the table as CSV")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of accuracy vs layer-average visual tokens (needs matplotlib: pip install 'fvlm[plot]')")
    p.add_argument("--metric", default=None,
                   help="the column --plot draws (default: accuracy, else the only lmms-eval metric), e.g. pope/pope_accuracy")
    p.set_defaults(func=run)


def read_summary(path: Path) -> dict:
    """A run's summary (``path`` is its folder or its summary.json); a clear error if there is none."""
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path}: no summary.json (not the output folder of a finished fvlm run)")
    try:
        summary = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict) or "selector" not in summary:
        raise UsageError(f"{file}: not an fvlm run summary (no 'selector')")
    return summary


def lmms_scores(path: Path) -> dict[str, float]:
    """Task metrics of the lmms-eval results files below a run folder, as ``task/metric`` (a filter
    other than ``none`` in brackets); where several files score a task, the newest file wins."""
    folder = path if path.is_dir() else path.parent
    scores: dict[str, float] = {}
    for file in sorted(folder.rglob("*_results.json"), key=lambda f: f.name):  # names start with the date
        try:
            results = json.loads(file.read_text()).get("results") or {}
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise UsageError(f"{file}: not an lmms-eval results file ({exc})") from None
        for task, metrics in results.items():
            for key, value in (metrics.items() if isinstance(metrics, dict) else ()):
                metric, _, kind = key.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric:
                    scores[f"{task}/{metric}" + (f"[{kind}]" if kind not in ("", "none") else "")] = float(value)
    return scores


def score_names(table: list[dict]) -> list[str]:
    """The lmms-eval metrics any run of the table has, sorted."""
    return sorted({key for row in table for key in row.get("scores", {})})


def columns(table: list[dict]) -> list[str]:
    """``COLUMNS`` with the lmms-eval metrics any run has after ``accuracy``."""
    at = COLUMNS.index("accuracy") + 1
    return [*COLUMNS[:at], *score_names(table), *COLUMNS[at:]]


def rows(runs: list[Path], reference: Path | None = None) -> list[dict]:
    """One row per run (see ``COLUMNS``; ``scores``: lmms-eval's metrics, also one key each).

    ``speedup`` is the reference run's prefill time over the run's; ``paired_speedup`` is the run's own
    ``prefill_speedup`` (the unpruned model timed on the same batches; fidelity runs only).
    """
    summaries = [(path, read_summary(path)) for path in runs]
    if reference is not None:
        ref = read_summary(reference)
    else:
        ref = next((s for _, s in summaries if s.get("selector") in ("none", None)), None)
    ref_prefill = ((ref or {}).get("efficiency") or {}).get("prefill_ms")
    out = []
    for path, s in summaries:
        eff = s.get("efficiency") or {}
        args = s.get("selector_args")
        prefill = eff.get("prefill_ms")
        out.append({
            "run": str(path),
            "selector": s.get("selector"),
            "args": json.dumps(args, separators=(",", ":")) if args else "",
            "positions": s.get("positions") or "",
            "samples": s.get("samples"),
            "accuracy": s.get("accuracy"),
            "layer_average": s.get("layer_average", eff.get("layer_average")),
            "llm_input_visual": eff.get("llm_input_visual"),
            "kv_mib": eff["kv_bytes"] / 2**20 if eff.get("kv_bytes") is not None else None,
            "prefill_ms": prefill,
            "decode_ms_per_token": eff.get("decode_ms_per_token"),
            "speedup": ref_prefill / prefill if ref_prefill and prefill else None,
            "paired_speedup": eff.get("prefill_speedup"),
        })
        out[-1]["scores"] = lmms_scores(path)
        out[-1].update(out[-1]["scores"])
    return out


_FORMATS = {"accuracy": ".3f", "layer_average": ".1f", "llm_input_visual": ".1f", "kv_mib": ".2f",
            "prefill_ms": ".1f", "decode_ms_per_token": ".2f", "speedup": ".2f", "paired_speedup": ".2f"}


def _cell(row: dict, column: str) -> str:
    """A row's value in ``column`` as the printed and Markdown tables show it (lmms-eval metrics: 4 digits)."""
    value = row.get(column)
    if value is None:
        return "-"
    return format(value, _FORMATS.get(column, ".4g")) if isinstance(value, float) else str(value)


def markdown(table: list[dict]) -> str:
    names = columns(table)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in table:
        cells = [_cell(row, c).replace("|", "\\|") for c in names]
        lines.append("| " + " | ".join(f"`{v}`" if c == "args" and v != "-" else v for c, v in zip(names, cells)) + " |")
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        names = columns(table)
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows({c: ("" if row.get(c) is None else row[c]) for c in names} for row in table)


def plotted_metric(table: list[dict], metric: str | None) -> str:
    """The column ``--plot`` draws: ``metric``, else accuracy, else the only lmms-eval metric (several: an error)."""
    numeric = [name for name in columns(table) if name not in ("run", "selector", "args", "positions")]
    if metric is None:
        scores = score_names(table)
        if any(row["accuracy"] is not None for row in table) or not scores:
            metric = "accuracy"
        elif len(scores) == 1:
            metric = scores[0]
        else:
            raise UsageError("--plot: no run has fvlm's accuracy; name the lmms-eval metric to draw with --metric "
                             f"(one of {', '.join(scores)})")
    if metric not in numeric:
        raise UsageError(f"--metric {metric}: not a numeric column of this table; choose from {', '.join(numeric)}")
    return metric


def plot(table: list[dict], path: Path, metric: str = "accuracy") -> None:
    """``metric`` (accuracy) against layer-average visual tokens, one labelled point per run that has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in table if r.get(metric) is not None and r["layer_average"] is not None]
    scale = 100 if metric == "accuracy" else 1
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for r in points:
        ax.scatter(r["layer_average"], scale * r[metric])
        ax.annotate(r["selector"], (r["layer_average"], scale * r[metric]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("layer-average visual tokens")
    ax.set_ylabel("accuracy (%)" if metric == "accuracy" else metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'fvlm[plot]'") from None
    table = rows(args.runs, args.reference)
    metric = plotted_metric(table, args.metric) if args.plot is not None else None
    from rich.console import Console
    from rich.table import Table

    shown = Table(title="fvlm compare", title_justify="left")
    names = columns(table)
    for column in names:
        shown.add_column(column, overflow="fold")
    for row in table:
        shown.add_row(*(_cell(row, c) for c in names))
    Console(highlight=False).print(shown)
    if args.csv is not None:
        write_csv(table, args.csv)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(table))
    if args.plot is not None:
        plot(table, args.plot, metric)
    return ExitCode.OK
