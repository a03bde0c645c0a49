"""Accuracy of every registered selector on the built-in model, at several visual-token budgets.

    python benchmarks/accuracy.py --n 200 --budgets 192 128 64 32 \\
        --out docs/benchmarks-accuracy.md --plot docs/img/accuracy.png

Runs greedy ``generate`` on ``--n`` held-out test records of the synthetic task
(:mod:`fvlm.builtin.synthetic`) once unpruned and once per (selector, budget) under
``fvlm.prune``, in left-padded batches, and reports

* accuracy: exact match with the reference answer;
* fidelity: exact match with the unpruned model's own answer;
* the layer-average visual-token count (``session.trace``) and the time per sample.

Budget ``b`` means ``b`` of the 576 visual tokens survive the selector's first pruning point (see
:mod:`fvlm.builtin.budgets` for each selector's arguments). Every selector that prunes inside the
language model gets a control row: seeded random picks at the same pruning points with the same
counts (:func:`random_control`), so that a method is compared with chance at equal cost. A selector that is missing, cannot be
built or fails on this model is reported as failed, with its error, and the run goes on. Writes a
Markdown report (``--out``), optionally a plot (``--plot``, needs matplotlib: ``pip install
'fvlm[plot]'``) and the raw numbers (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import fvlm  # noqa: E402
import fvlm.adapters  # noqa: E402
from fvlm import builtin  # noqa: E402
from fvlm.builtin import budgets as B  # noqa: E402
from fvlm.builtin import synthetic  # noqa: E402
from fvlm.builtin.oracle import GroundTruthSelector, patch_order  # noqa: E402


def run(model, processor, records, batch_size: int, selector=None, max_new_tokens: int = 2,
        positions: str | None = "original") -> dict:
    """Answers for every record (in record order), the log-probabilities of the first answer token,
    the mean layer-average visual-token count and the seconds taken, through
    [`Answerer`][fvlm.answering.Answerer] (batches of prompts sorted by length).

    ``selector``: ``None`` (unpruned), a selector, or a callable ``chunk -> selector`` for selectors
    built per batch from the records' indices (the ground-truth oracle). Each question is its
    sample's instruction for instruction-conditioned selectors; ``positions`` the session's
    position policy (``None``: each selector's own).
    """
    from fvlm.answering import Answerer, Prompt

    per_batch = None if selector is None or isinstance(selector, fvlm.TokenSelector) else selector
    answerer = Answerer(model, processor, None if per_batch else selector, {"max_new_tokens": max_new_tokens},
                        positions=positions, first_logprobs=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = answerer.answer_all([Prompt([r["image"]], r["question"]) for r in records], batch_size,
                                  selector_for=per_batch)
    layer_avg = [r["efficiency"]["layer_average"] for r in out]
    return {"answers": [r["answer"] for r in out], "first_logprobs": torch.stack([r["first_logprobs"] for r in out]),
            "layer_average": sum(layer_avg) / len(layer_avg),
            "seconds": time.perf_counter() - start}


def first_token_kl(reference: torch.Tensor, pruned: torch.Tensor) -> float:
    """Mean KL(unpruned || pruned) of the first answer token's distribution, in nats."""
    return float((reference.exp() * (reference - pruned)).sum(dim=-1).mean())


def schedule(selector, info) -> list[tuple]:
    """``[(where, keep), ...]`` of the stages that drop tokens (a float ``keep`` of 1.0 keeps all:
    left out) on the model described by ``info``."""
    stages = sorted(selector.stages(info), key=lambda s: s.order)
    return [(s.where, s.keep) for s in stages if not (isinstance(s.keep, float) and s.keep == 1.0)]


def in_llm(stages: list[tuple]) -> bool:
    return any(isinstance(where, int) for where, _ in stages)


def control(kind: str, stages: list[tuple], orders: list[list[int]] | None = None):
    """The ``random``, ``uniform`` or ``oracle`` control at the given ``(where, keep)`` stages.

    ``random`` / ``uniform``: the registered selector (several stages: a ``compose`` of them, each
    later stage choosing among the survivors of the one before). ``oracle``: a callable building a
    :class:`~fvlm.builtin.oracle.GroundTruthSelector` per batch from ``orders`` (per record).
    """
    if kind == "oracle":
        return lambda chunk: GroundTruthSelector([orders[i] for i in chunk], stages)
    parts = [fvlm.create_selector(kind, keep=keep, layer=where, **({"seed": 0} if kind == "random" else {}))
             for where, keep in stages]
    return parts[0] if len(parts) == 1 else fvlm.create_selector("compose", selectors=parts)


def where_label(stages: list[tuple]) -> str:
    """``input``, ``vision``, ``after layer 2``, ``after layers 1, 2, 3``, ``vision + after layer 2``."""
    layers = [str(w) for w, _ in stages if isinstance(w, int)]
    named = [w for w, _ in stages if not isinstance(w, int)]
    parts = list(dict.fromkeys(named))
    if layers:
        parts.append(f"after layer{'s' if len(layers) > 1 else ''} {', '.join(layers)}")
    return " + ".join(parts) or "-"


def score(answers, records, reference) -> dict:
    n = len(records)
    per_kind: dict[str, list[int]] = {}
    for a, r in zip(answers, records):
        c = per_kind.setdefault(r["kind"], [0, 0])
        c[0] += int(a == r["answer"])
        c[1] += 1
    return {
        "accuracy": sum(a == r["answer"] for a, r in zip(answers, records)) / n,
        "fidelity": sum(a == b for a, b in zip(answers, reference)) / n,
        "per_kind": {k: c / t for k, (c, t) in sorted(per_kind.items())},
    }


def _plan(labels: list[str], budgets: list[int], info, n_visual: int, convention: str, orders,
          kinds: tuple[str, ...] = ("random",)) -> dict:
    """Rows in table order: ``{label: {selector, where, [control_for], cells: {budget: (kwargs text,
    factory)}}}`` or ``{label: {error}}``.

    Budgets follow ``convention`` (``first-stage``: tokens kept at the first pruning point;
    ``layer-average``: tokens averaged over the decoder layers). Every in-LLM schedule gets the
    controls ``kinds`` (of ``random``, ``uniform``, ``oracle``) at the same stages, right before the
    first method that uses it (methods with the same schedule at every budget share them); with
    ``oracle`` in ``kinds``, the pre-LLM ground truth comes before the first pre-LLM method.
    """
    plan: dict[str, dict] = {}
    controls: dict[tuple, str] = {}

    def add_controls(stages: dict, label: str, kinds: tuple[str, ...]) -> None:
        key = tuple(tuple(st) for st in stages.values())
        if key not in controls:
            where = where_label(next(iter(stages.values())))
            suffix = where if all(where not in name for name in controls.values()) else f"{where}, as {label}"
            controls[key] = suffix
            for kind in kinds:
                plan[f"{kind} ({suffix})"] = {
                    "selector": kind, "where": where, "control_for": [],
                    "cells": {b: (B.describe({"stages": st}), lambda kind=kind, st=st: control(kind, st, orders))
                              for b, st in stages.items()}}
        for kind in kinds:
            plan[f"{kind} ({controls[key]})"]["control_for"].append(label)

    for label in labels:
        try:
            setting = B.setting(label)
        except Exception as exc:  # unknown name, broken plugin, no budget mapping
            plan[label] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        cells, stages = {}, {}
        for budget in (budgets if setting.budgeted else [None]):
            key = "all" if budget is None else str(budget)
            try:
                if budget is None or convention == "first-stage":
                    kwargs = setting.make_kwargs(budget or 0, info.num_layers)
                else:
                    kwargs = setting.average_kwargs(budget, info.num_layers, n_visual)
                stages[key] = schedule(fvlm.create_selector(setting.selector, **kwargs), info)
            except Exception as exc:  # reported when the cell runs
                kwargs, stages[key] = None, None
                cells[key] = ("-", lambda exc=exc: _raise(exc))
                continue
            cells[key] = (B.describe(kwargs), lambda s=setting.selector, k=kwargs: fvlm.create_selector(s, **k))
        known = [st for st in stages.values() if st is not None]
        entry = {"selector": setting.selector, "where": where_label(known[0]) if known else "-", "cells": cells}
        if setting.budgeted and known and len(known) == len(stages):
            if in_llm(known[0]):
                add_controls(stages, label, kinds)
            elif "oracle" in kinds and "oracle (input)" not in plan:
                add_controls({b: [("input", int(b))] for b in stages}, label, ("oracle",))
        plan[label] = entry
    return plan


def _raise(exc: Exception):
    raise exc


def benchmark(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, processor = builtin.load(args.checkpoint)
    num_layers = model.config.text_config.num_hidden_layers
    task = builtin.task_of(args.checkpoint)
    records = task.dataset(args.split, args.n, seed=args.seed)
    base = run(model, processor, records, args.batch_size, max_new_tokens=args.max_new_tokens)
    reference = base["answers"]
    results = {"unpruned": {**score(reference, records, reference), "layer_average": base["layer_average"], "kl": 0.0,
                            "ms_per_sample": 1e3 * base["seconds"] / len(records)}}
    print(f"unpruned: accuracy {results['unpruned']['accuracy']:.1%}", flush=True)

    info = fvlm.adapters.adapter_for(model).info()
    orders = [patch_order(r) for r in records]
    plan = _plan(args.selectors or B.default_labels(), args.budgets, info, model.config.image_seq_length,
                 args.convention, orders, tuple(args.controls))
    rows = {}
    for label, entry in plan.items():
        row = rows[label] = {k: v for k, v in entry.items() if k != "cells"}
        if "error" in entry:
            print(f"{label}: failed ({row['error']})", flush=True)
            continue
        for key, (kwargs, make) in entry["cells"].items():
            cell = row[key] = {"kwargs": kwargs}
            try:
                selector = make()
                out = run(model, processor, records, args.batch_size, selector, args.max_new_tokens,
                          _positions(args))
            except Exception as exc:
                cell["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                print(f"{label} @ {key}: failed ({cell['error']})", flush=True)
                continue
            cell.update(score(out["answers"], records, reference), layer_average=out["layer_average"],
                        kl=first_token_kl(base["first_logprobs"], out["first_logprobs"]),
                        ms_per_sample=1e3 * out["seconds"] / len(records))
            print(f"{label} @ {key}: accuracy {cell['accuracy']:.1%}, fidelity {cell['fidelity']:.1%}, "
                  f"KL {cell['kl']:.3f}, layer avg {cell['layer_average']:.1f}, {cell['ms_per_sample']:.0f} ms/sample",
                  flush=True)
    results["rows"] = rows
    results["meta"] = {
        "n": len(records), "split": args.split, "seed": args.seed, "budgets": args.budgets,
        "batch_size": args.batch_size, "num_layers": num_layers, "convention": args.convention,
        "positions": args.positions, "checkpoint": str(args.checkpoint or "grounded"),
        "task": task.__name__.rsplit(".", 1)[-1], "kinds": list(task.KINDS),
        "visual_tokens": int(model.config.image_seq_length), "seconds": time.perf_counter() - started,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "command": "python benchmarks/accuracy.py " + " ".join(args.argv),
    }
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(cell: dict, metric: str) -> str:
    if "error" in cell:
        return "failed"
    return f"{cell[metric]:.3f}" if metric == "kl" else _pct(cell[metric])


def _layer_averages(row: dict, budgets: list[str]) -> str:
    if "all" in row:
        return _avg(row["all"])
    return " / ".join(_avg(row.get(b, {"error": None})) for b in budgets)


def _avg(cell: dict) -> str:
    return "-" if "error" in cell else f"{cell['layer_average']:.0f}"


def control_gaps(rows: dict, budgets: list[str], kind: str = "random") -> list[tuple[str, str, float]]:
    """``(method, budget, accuracy of method - accuracy of its ``kind`` control)`` for every in-LLM cell
    (``kind="oracle"``: for every pre-LLM and in-LLM control schedule, the oracle minus random picks)."""
    gaps = []
    for name, row in rows.items():
        if row.get("selector") != kind or not row.get("control_for"):
            continue
        for label in row["control_for"]:
            method = rows.get(label, {}) if kind == "random" else rows.get(name.replace("oracle", "random", 1),
                                                                           rows.get("random", {}))
            for b in budgets:
                a, c = (method.get(b, {}), row.get(b, {})) if kind == "random" else (row.get(b, {}), method.get(b, {}))
                if "accuracy" in a and "accuracy" in c:
                    gaps.append((label if kind == "random" else name, b, a["accuracy"] - c["accuracy"]))
            if kind == "oracle":
                break  # one line per control schedule
    return gaps


def _range(gaps: list[tuple[str, str, float]]) -> str:
    low, high = min(gaps, key=lambda g: g[2]), max(gaps, key=lambda g: g[2])
    return (f"from {100 * low[2]:+.1f} points (`{low[0]}` at {low[1]}) to {100 * high[2]:+.1f} points "
            f"(`{high[0]}` at {high[1]})")


def _control_summary(rows: dict, budgets: list[str]) -> list[str]:
    methods, oracle = control_gaps(rows, budgets), control_gaps(rows, budgets, "oracle")
    if not methods and not oracle:
        return []
    names = {"random": "seeded `random` picks", "uniform": "`uniform` (spatial-grid) picks",
             "oracle": "the ground-truth `oracle`"}
    kinds = [k for k in names if any(row.get("selector") == k and row.get("control_for") for row in rows.values())]
    text = ("**Controls** (in italics). Every method that prunes inside the language model is listed after "
            + ", ".join(names[k] for k in kinds) + " at the same pruning points with the same counts. ")
    if oracle:
        text += ("The oracle keeps the patches of the objects the question is about (the generator's boxes), then "
                 "random ones. ")
    if oracle:
        text += (f"Oracle minus random picks at the same schedule ranges {_range(oracle)}: where this gap is "
                 "small, which tokens survive does not matter and no selector can be ranked there. ")
    if methods:
        text += (f"Accuracy of the in-LLM methods minus their random control's ranges {_range(methods)}; a "
                 "method is only shown to choose well where it beats its control.")
    return [text, ""]


def _budget_text(meta: dict) -> str:
    v, layers = meta["visual_tokens"], meta["num_layers"]
    if meta.get("convention") == "layer-average":
        return (f"A budget `N` is the number of visual tokens averaged over the {layers} decoder layers (the "
                f"papers' convention, so every column is at equal cost): methods that prune before the language "
                f"model (`input`, `vision`) keep `N` of the {v}; in-LLM methods prune where the authors do on "
                "32-layer LLaVA-1.5, scaled to this depth (column *pruned*), and keep as many tokens as make "
                "their average `N`. The last column lists the measured layer averages.")
    return (f"A budget `b` keeps `b` of the {v} visual tokens from the selector's first pruning point on (column "
            "*pruned*): before the language model (`input`, `vision`) or after a decoder layer, in which case "
            "the earlier layers still see all tokens and the layer-average token count (last column, one figure "
            "per budget) is higher than `b`: an in-LLM row is not at the same cost as a pre-LLM row of the same "
            "budget.")


def markdown(results: dict) -> str:
    meta, rows, base = results["meta"], results["rows"], results["unpruned"]
    budgets = [str(b) for b in meta["budgets"]]
    v = meta["visual_tokens"]
    name = meta.get("checkpoint", "grounded")
    task = meta.get("task", "synthetic")
    kinds = meta.get("kinds") or list(base["per_kind"])
    loader = "fvlm.builtin.load()" if name == "grounded" else f"fvlm.builtin.load({name!r})"
    lines = [
        f"# Accuracy benchmark{' at equal layer-average cost' if meta.get('convention') == 'layer-average' else ''}: "
        f"selectors on the built-in `{name}` model",
        "",
        "Generated by `" + meta["command"] + "` "
        f"({meta['seconds'] / 60:.1f} min on a {meta['machine']} CPU, torch {meta['torch']}, "
        f"{meta['threads']} thread(s)); do not edit by hand.",
        "",
        f"Model: `{loader}`, a shipped LLaVA-1.5-layout checkpoint ({v} visual tokens per image, "
        f"CLIP vision tower with CLS, {meta['num_layers']} Llama decoder layers), trained on the synthetic task of "
        f"`fvlm.builtin.{task}`. Data: the first {meta['n']} records of the held-out `{meta['split']}` split "
        f"(seed {meta['seed']}; the question kinds {', '.join(f'`{k}`' for k in kinds)} in equal shares). "
        f"Greedy decoding, left-padded batches of {meta['batch_size']}.",
        "",
        f"**Unpruned accuracy: {_pct(base['accuracy'])} %** ({meta['n']} records). "
        "*Accuracy* is exact match with the reference answer; fidelity to the unpruned model is measured as "
        "*agreement* (exact match with its answer) and *first-token KL* (KL divergence of the unpruned model's "
        "first answer-token distribution from the pruned one's, nats). " + _budget_text(meta)
        + f" Kept tokens keep {positions_text(meta.get('positions', 'original'))} position ids in every row "
        "(`--positions`; the built-in model was trained with the original ids, and renumbering them costs it "
        "accuracy whatever the selector), so rows differ only in the tokens they keep. `pool` averages s x s "
        "blocks (s = round(sqrt(576 / b))), so its real count differs from the budget (see the layer averages). "
        "`cdpruner` takes its relevance from the LLM embeddings of the question (the built-in model has no CLIP "
        "text tower). Settings per selector: `fvlm/builtin/budgets.py`.",
        "",
        *_control_summary(rows, budgets),
        "## Accuracy (%)",
        "",
    ]

    def table(metric: str) -> list[str]:
        out = ["| selector | pruned | " + " | ".join(budgets) + " | layer-average tokens |",
               "|---" * (len(budgets) + 3) + "|"]
        out.append("| (unpruned) | - | " + " | ".join(_cell(base, metric) for _ in budgets) + f" | {v} |")
        for label, row in rows.items():
            name = f"*{label}*" if row.get("control_for") else label
            if "error" in row:
                out.append(f"| {name} | failed | " + " | ".join("failed" for _ in budgets) + " | - |")
            elif "all" in row:
                out.append(f"| {name} (all {v}) | {row['where']} | "
                           + " | ".join(_cell(row["all"], metric) for _ in budgets) + f" | {_layer_averages(row, budgets)} |")
            else:
                out.append(f"| {name} | {row['where']} | " + " | ".join(_cell(row[b], metric) for b in budgets)
                           + f" | {_layer_averages(row, budgets)} |")
        return out

    # the section markers let docs/benchmarks.md include this table (pymdownx.snippets)
    lines += ["<!-- --8<-- [start:accuracy-table] -->", *table("accuracy"), "<!-- --8<-- [end:accuracy-table] -->"]
    lines += ["", "## Fidelity: agreement with the unpruned model (%)", ""] + table("fidelity")
    if "kl" in base:
        lines += ["", "## Fidelity: first-token KL to the unpruned model (nats)", ""] + table("kl")
    if results.get("plot"):
        lines += ["", f"![accuracy vs budget]({results['plot']})"]
    if results.get("picture"):
        pic = results["picture"]
        lines += ["", "## What the selectors keep", "",
                  f"Test record {pic['sample']}, budget {pic['keep']} of {v} "
                  f"(`fvlm visualize --sample {pic['sample']} --keep {pic['keep']} --selectors "
                  f"{' '.join(pic['labels'])}`): kept patches in colour, the rest dimmed, each selector's answer "
                  "in its title.", "", f"![kept patches]({pic['path']})"]

    smallest = budgets[-1] if budgets else None
    kinds = list(base["per_kind"])
    lines += ["", f"## Accuracy per question kind at budget {smallest} (%)", "",
              "| selector | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|",
              "| (unpruned) | " + " | ".join(_pct(base["per_kind"][k]) for k in kinds) + " |"]
    for label, row in rows.items():
        cell = row.get(smallest) or row.get("all")
        if cell and "error" not in cell and "error" not in row:
            lines.append(f"| {label} | " + " | ".join(_pct(cell["per_kind"].get(k, 0.0)) for k in kinds) + " |")

    lines += ["", "## Settings, layer-average visual tokens, time", "",
              "| selector | budget | arguments | layer-average visual tokens | ms / sample |", "|---|---|---|---|---|",
              f"| (unpruned) | {v} | - | {base['layer_average']:.1f} | {base['ms_per_sample']:.0f} |"]
    failures = []
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | - | - | - | - |")
            failures.append(f"- `{label}`: {row['error']}")
            continue
        for key, cell in row.items():
            if not isinstance(cell, dict):
                continue
            if "error" in cell:
                lines.append(f"| {label} | {key} | `{cell['kwargs']}` | failed | - |")
                failures.append(f"- `{label}` at budget {key}: {cell['error']}")
            else:
                lines.append(f"| {label} | {key} | `{cell['kwargs']}` | {cell['layer_average']:.1f} | "
                             f"{cell['ms_per_sample']:.0f} |")
    if failures:
        lines += ["", "## Failures", ""] + failures
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib ({exc}); install it with: pip install 'fvlm[plot]'") from exc
    meta, base = results["meta"], results["unpruned"]
    budgets = meta["budgets"]
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    ax.axhline(100 * base["accuracy"], color="black", linestyle="--", linewidth=1,
               label=f"unpruned ({meta['visual_tokens']} tokens)")
    markers, styles = "osD^vP*Xh<>", ["-", "--", "-.", ":"]
    colours = plt.get_cmap("tab20").colors
    drawn = 0
    for label, row in results["rows"].items():
        if "error" in row or "all" in row:
            continue
        xs = [b for b in budgets if "error" not in row[str(b)]]
        if not xs:
            continue
        ys = [100 * row[str(b)]["accuracy"] for b in xs]
        if row.get("control_for"):  # controls: oracle black, random / uniform grey, all thin
            colour = "black" if row["selector"] == "oracle" else "grey"
            style = {"oracle": "--", "random": ":", "uniform": "-."}[row["selector"]]
            ax.plot(xs, ys, color=colour, linewidth=0.8, linestyle=style, marker=".", label=label)
            continue
        ax.plot(xs, ys, marker=markers[drawn % len(markers)], linestyle=styles[drawn % len(styles)],
                color=colours[(2 * drawn) % 20], label=label)
        drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel(f"layer-average visual tokens (of {meta['visual_tokens']})" if meta.get("convention") == "layer-average"
                  else f"visual tokens kept at the first pruning point (of {meta['visual_tokens']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Built-in {meta.get('checkpoint', 'grounded')} model, {meta['n']} held-out records")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def picture(args, labels: list[str]) -> dict:
    """Draw the kept patches of ``labels`` for one test record (``fvlm visualize``) into ``args.visualize``."""
    from fvlm.commands.visualize import render

    model, processor = builtin.load(args.checkpoint)
    record = synthetic.sample(args.split, args.visualize_sample, seed=args.seed)
    sheet, _ = render(model, processor, record["image"], record["question"], labels, args.visualize_keep,
                      record["answer"], positions=_positions(args))
    args.visualize.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.visualize)
    return {"sample": args.visualize_sample, "keep": args.visualize_keep, "labels": labels}


def positions_text(policy: str) -> str:
    return {"original": "their original", "compact": "compact (renumbered)", "own": "each selector's own"}[policy]


def _positions(args) -> str | None:
    return None if args.positions == "own" else args.positions


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="test records")
    p.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64, 32])
    p.add_argument("--selectors", nargs="+", default=None,
                   help="rows (registered names or labels of fvlm/builtin/budgets.py); default: all registered")
    p.add_argument("--split", default="test", choices=synthetic.SPLITS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--checkpoint", default=None,
                   help="built-in checkpoint name or model folder, its task read from its training.json (default: grounded)")
    p.add_argument("--convention", choices=("first-stage", "layer-average"), default="first-stage",
                   help="what a budget counts: the visual tokens kept at a selector's first pruning point, or "
                        "the visual tokens averaged over all decoder layers (the papers' convention: in-LLM "
                        "methods keep fewer tokens to reach the same average)")
    p.add_argument("--controls", nargs="+", choices=("random", "uniform", "oracle"), default=["random"],
                   help="controls run at the pruning points and counts of every in-LLM schedule (oracle: the "
                        "patches of the objects the question is about, also as a pre-LLM row; default: random)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--positions", choices=["original", "compact", "own"], default="original",
                   help="position ids of the kept tokens for every row: original (default: the model was trained "
                        "with them, so rows differ only in the tokens kept), compact, or each selector's own policy")
    p.add_argument("--out", type=Path, default=None, help="Markdown report")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot of accuracy vs budget (needs matplotlib)")
    p.add_argument("--json", type=Path, default=None, help="raw results")
    p.add_argument("--visualize", type=Path, default=None,
                   help="also draw the patches a few selectors keep on one test record (PNG, shown in the report)")
    p.add_argument("--visualize-sample", type=int, default=3, help="test record for --visualize")
    p.add_argument("--visualize-keep", type=int, default=64, help="budget for --visualize")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot:  # fail before the long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"--plot needs matplotlib ({exc}); install it with: pip install 'fvlm[plot]'") from exc
    results = benchmark(args)
    if args.plot:
        plot(results, args.plot)
        if args.out:
            results["plot"] = os.path.relpath(args.plot, args.out.parent)
    if args.visualize:
        wanted = [n for n in ("pio_fvlm", "fastv", "visionzip", "vscan", "cdpruner", "pool") if n in fvlm.list_selectors()]
        results["picture"] = picture(args, wanted)
        if args.out:
            results["picture"]["path"] = os.path.relpath(args.visualize, args.out.parent)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"done in {results['meta']['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
