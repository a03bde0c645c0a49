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
:mod:`fvlm.builtin.budgets` for each selector's arguments). A selector that is missing, cannot be
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
from fvlm import builtin  # noqa: E402
from fvlm.builtin import budgets as B  # noqa: E402
from fvlm.builtin import synthetic  # noqa: E402


def run(model, processor, batches, n: int, selector=None, max_new_tokens: int = 2, questions=None,
        positions: str | None = "original") -> dict:
    """Answers for every record (in record order), mean layer-average visual tokens, seconds.
    ``questions`` (per record) are each sample's instruction for instruction-conditioned selectors;
    ``positions`` the session's position policy (``None``: each selector's own)."""
    answers: list[str | None] = [None] * n
    layer_avg: list[float] = []
    start = time.perf_counter()
    for chunk, inputs in batches:
        if selector is None:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            layer_avg += [float(model.config.image_seq_length)] * len(chunk)
        else:
            texts = None if questions is None else [questions[i] for i in chunk]
            with fvlm.prune(model, selector, positions=positions, instructions=texts) as session, torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            layer_avg += session.trace.layer_average
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            answers[i] = text.strip()
    return {"answers": answers, "layer_average": sum(layer_avg) / len(layer_avg),
            "seconds": time.perf_counter() - start}


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


def benchmark(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, processor = builtin.load(args.checkpoint)
    num_layers = model.config.text_config.num_hidden_layers
    records = synthetic.dataset(args.split, args.n, seed=args.seed)
    batches = list(builtin.length_batches(processor, [r["image"] for r in records],
                                          [r["question"] for r in records], args.batch_size, model.dtype))

    base = run(model, processor, batches, len(records), max_new_tokens=args.max_new_tokens)
    reference = base["answers"]
    results = {"unpruned": {**score(reference, records, reference), "layer_average": base["layer_average"],
                            "ms_per_sample": 1e3 * base["seconds"] / len(records)}}
    print(f"unpruned: accuracy {results['unpruned']['accuracy']:.1%}", flush=True)

    labels = args.selectors or B.default_labels()
    rows = {}
    for label in labels:
        row = rows[label] = {}
        try:
            setting = B.setting(label)
        except Exception as exc:  # unknown name, broken plugin, no budget mapping
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{label}: failed ({row['error']})", flush=True)
            continue
        row["selector"] = setting.selector
        for budget in (args.budgets if setting.budgeted else [None]):
            key = "all" if budget is None else str(budget)
            cell = row[key] = {"kwargs": "-"}
            try:
                kwargs = setting.make_kwargs(budget or 0, num_layers)
                cell["kwargs"] = B.describe(kwargs)
                selector = fvlm.create_selector(setting.selector, **kwargs)
                out = run(model, processor, batches, len(records), selector, args.max_new_tokens,
                          [r["question"] for r in records], _positions(args))
            except Exception as exc:
                cell["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                print(f"{label} @ {key}: failed ({cell['error']})", flush=True)
                continue
            cell.update(score(out["answers"], records, reference), layer_average=out["layer_average"],
                        ms_per_sample=1e3 * out["seconds"] / len(records))
            print(f"{label} @ {key}: accuracy {cell['accuracy']:.1%}, fidelity {cell['fidelity']:.1%}, "
                  f"layer avg {cell['layer_average']:.1f}, {cell['ms_per_sample']:.0f} ms/sample", flush=True)
    results["rows"] = rows
    results["meta"] = {
        "n": len(records), "split": args.split, "seed": args.seed, "budgets": args.budgets,
        "batch_size": args.batch_size, "num_layers": num_layers, "positions": args.positions,
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
    return _pct(cell[metric])


def markdown(results: dict) -> str:
    meta, rows, base = results["meta"], results["rows"], results["unpruned"]
    budgets = [str(b) for b in meta["budgets"]]
    v = meta["visual_tokens"]
    lines = [
        "# Accuracy benchmark: selectors on the built-in model",
        "",
        "Generated by `" + meta["command"] + "` "
        f"({meta['seconds'] / 60:.1f} min on a {meta['machine']} CPU, torch {meta['torch']}, "
        f"{meta['threads']} thread(s)); do not edit by hand.",
        "",
        f"Model: `fvlm.builtin.load()`, the shipped LLaVA-1.5-layout checkpoint ({v} visual tokens per image, "
        f"CLIP vision tower with CLS, {meta['num_layers']} Llama decoder layers), trained on the synthetic "
        "grounded VQA task of `fvlm.builtin.synthetic`. Data: the first "
        f"{meta['n']} records of the held-out `{meta['split']}` split (seed {meta['seed']}; the five question "
        "kinds in equal shares, yes/no balanced). Greedy decoding, left-padded batches of "
        f"{meta['batch_size']}.",
        "",
        f"**Unpruned accuracy: {_pct(base['accuracy'])} %** ({meta['n']} records). "
        "*Accuracy* is exact match with the reference answer, *fidelity* exact match with the unpruned "
        f"model's answer. A budget `b` keeps `b` of the {v} visual tokens from the selector's first pruning "
        "point on: before the language model for `random`, `uniform`, `divprune`, `visionzip`, `cdpruner`, "
        "`vscan_encoder` (and the encoder stage of `vscan` and `pio_fvlm_ve`, which keep a third of it after "
        "layer 2); after decoder layer 2 (`fastv`, `sparsevlm`, `dart`) or 1 (`pio_fvlm`) for the in-LLM "
        "methods, whose earlier layers still see all tokens (compare the layer averages below). Kept tokens "
        f"keep {positions_text(meta.get('positions', 'original'))} position ids in every row (`--positions`; the "
        "built-in model was trained with the original ids, and renumbering them costs it accuracy whatever the "
        "selector), so rows differ only in the tokens they keep. `pool` "
        "averages s x s blocks (s = round(sqrt(576 / b)): 144, 144, 64, 36 tokens). `cdpruner` takes its "
        "relevance from the LLM embeddings of the question (the built-in model has no CLIP text tower). "
        "Settings per selector: `fvlm/builtin/budgets.py`.",
        "",
        "## Accuracy (%)",
        "",
    ]

    def table(metric: str) -> list[str]:
        out = ["| selector | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        out.append("| (unpruned) | " + " | ".join(_pct(base[metric]) for _ in budgets) + " |")
        for label, row in rows.items():
            if "error" in row:
                out.append(f"| {label} | " + " | ".join("failed" for _ in budgets) + " |")
            elif "all" in row:
                out.append(f"| {label} (all {v}) | " + " | ".join(_cell(row["all"], metric) for _ in budgets) + " |")
            else:
                out.append(f"| {label} | " + " | ".join(_cell(row[b], metric) for b in budgets) + " |")
        return out

    # the section markers let docs/benchmarks.md include this table (pymdownx.snippets)
    lines += ["<!-- --8<-- [start:accuracy-table] -->", *table("accuracy"), "<!-- --8<-- [end:accuracy-table] -->"]
    lines += ["", "## Fidelity to the unpruned model (%)", ""] + table("fidelity")
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
            if key == "selector":
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
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    ax.axhline(100 * base["accuracy"], color="black", linestyle="--", linewidth=1,
               label=f"unpruned ({meta['visual_tokens']} tokens)")
    markers, styles = "osD^vP*Xh<>", ["-", "--", "-.", ":"]
    colours = plt.get_cmap("tab20").colors
    drawn = 0
    for label, row in results["rows"].items():
        if "error" in row or "all" in row:
            continue
        xs = [b for b in budgets if "error" not in row[str(b)]]
        if xs:
            ax.plot(xs, [100 * row[str(b)]["accuracy"] for b in xs], marker=markers[drawn % len(markers)],
                    linestyle=styles[drawn % len(styles)], color=colours[(2 * drawn) % 20], label=label)
            drawn += 1
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel(f"visual tokens kept (of {meta['visual_tokens']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Built-in model, {meta['n']} held-out records")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2)
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
    p.add_argument("--checkpoint", default=None, help="model folder (default: the shipped one)")
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
