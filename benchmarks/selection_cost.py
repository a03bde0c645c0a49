"""Selection cost of every selector at 576 -> 64 visual tokens, side by side in one run.

Each selector prunes once to 64 visual tokens (single stage; in-LLM selectors after layer 2,
VisionZip on the vision side, DivPrune / uniform / random at the LLM input) on the same random
mid-size LLaVA and the same prompt. The cost is the session trace's per-stage wall time (scoring +
selection + gathering), reported next to one decoder-layer forward, the unit that makes figures
comparable across machines. PIO-FVLM is shown with its rows-only proxy (default) and with the
authors' full-block proxy with the LM head on all rows.

    python benchmarks/selection_cost.py --hidden 1024 --layers 4 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import fvlm
from fvlm.testing import sized_llava, sized_llava_inputs

KEEP = 64
CASES = {
    "random": dict(keep=KEEP),
    "uniform": dict(keep=KEEP),
    "divprune": dict(keep=KEEP),
    "visionzip": dict(dominant=54, contextual=10),
    "fastv": dict(k=2, keep=KEEP),
    "sparsevlm": dict(schedule=[(2, KEEP)], recycle=False),
    "dart": dict(layer=2, keep=KEEP),
    "pio_fvlm (rows proxy)": dict(layers=[2], keep=[KEEP]),
    "pio_fvlm (authors: block, head on all rows)": dict(layers=[2], keep=[KEEP], proxy="block", head_rows="all"),
}


def _layer_forward_seconds(model, inputs, repeats):
    """Wall time of decoder layer 2 on the full prompt (captured inputs, no cache)."""
    seen = {}
    layer = model.model.language_model.layers[2]
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    handle.remove()
    kwargs = {k: v for k, v in seen["kwargs"].items() if k in ("attention_mask", "position_embeddings", "position_ids")}
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            layer(*seen["args"], **kwargs)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = sized_llava(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    inputs = sized_llava_inputs(model, text_tokens=64)
    unit = _layer_forward_seconds(model, inputs, args.repeats)
    table = Table(title=f"selection cost at 576 -> {KEEP} visual tokens (hidden {args.hidden}, vocab {args.vocab}, "
                        f"{args.threads} thread(s)); one decoder-layer forward = {unit * 1e3:.1f} ms")
    for column in ("selector", "stage", "cost (ms, median)", "layer-forward equivalents"):
        table.add_column(column)
    for label, kwargs in CASES.items():
        name = label.split(" ")[0]
        if name not in fvlm.list_selectors():
            table.add_row(label, "-", "not installed", "-")
            continue
        costs, where = [], "-"
        for _ in range(args.repeats):
            with fvlm.prune(model, name, **kwargs) as session, torch.no_grad():
                model(**inputs)
            stages = session.trace.stages  # SparseVLM adds a keep-all rater stage at the input
            costs.append(sum(stage.seconds for stage in stages))
            where = " + ".join(str(stage.where) for stage in stages)
        cost = statistics.median(costs)
        table.add_row(label, where, f"{cost * 1e3:.1f}", f"{cost / unit:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
