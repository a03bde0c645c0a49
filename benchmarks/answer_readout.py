"""Where is the answer after each decoder layer? Linear readouts from the last prompt position.

    python benchmarks/answer_readout.py --train 1500 --test 500 --threads 2 \\
        --json docs/benchmarks/answer_readout_grounded.json

Runs the unpruned built-in model once over ``--train + --test`` records (the prompts `fvlm run`
builds) and keeps the hidden state of the last prompt position (the one that predicts the first
answer token) after every decoder layer (0: the input embeddings). On each layer it fits linear
classifiers on the ``--train`` records and scores them on the ``--test`` records:

* ``answer``: the record's answer;
* ``cells``: the colour of every one of the 9 cells of the layout (``empty`` for an empty cell),
  scored per cell: does the position hold the whole scene or only what the question asks?

Read next to the depth probe: if one random visual token after layer ``l`` keeps the accuracy
while the last position does not yet hold the answer after ``l``, the visual facts the answer
needs sit in the other text positions (the question's words) after ``l``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from fvlm import builtin  # noqa: E402
from fvlm.answering import Prompt, build_inputs  # noqa: E402
from fvlm.builtin import synthetic  # noqa: E402


@torch.no_grad()
def last_position_states(model, processor, records, batch_size: int) -> torch.Tensor:
    """``(records, layers + 1, hidden)``: the last prompt position after each decoder layer."""
    states = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        inputs = build_inputs(processor, [Prompt([r["image"]], r["question"]) for r in chunk])
        out = model(**inputs, output_hidden_states=True)
        states.append(torch.stack([h[:, -1] for h in out.hidden_states], dim=1).float())  # left padded
    return torch.cat(states)


def linear_readout(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 400) -> float:
    """Test accuracy of a linear softmax classifier (standardised inputs, Adam, small L2) fitted on the
    first ``n_train`` rows; ``y`` is ``(rows,)`` or ``(rows, slots)`` (one classifier per slot)."""
    torch.manual_seed(0)
    y = y.view(len(y), -1)
    slots, classes = y.shape[1], int(y.max()) + 1
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-5
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], slots * classes, requires_grad=True)
    bias = torch.zeros(slots * classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    with torch.enable_grad():
        for _ in range(steps):
            logits = (x[:n_train] @ weight + bias).view(-1, classes)
            loss = torch.nn.functional.cross_entropy(logits, y[:n_train].reshape(-1)) + 1e-3 * weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    predicted = (x[n_train:] @ weight + bias).view(len(x) - n_train, slots, classes).argmax(-1)
    return float((predicted == y[n_train:]).float().mean())


def majority(y: torch.Tensor, n_train: int) -> float:
    """Test accuracy of always answering the training rows' most common class (per slot)."""
    y = y.view(len(y), -1)
    common = y[:n_train].mode(dim=0).values
    return float((y[n_train:] == common).float().mean())


def cell_colours(record: dict) -> list[int]:
    """The colour of each of the 9 cells: 0 for empty, else 1 + its index in ``synthetic.COLOURS``."""
    colours = [0] * 9
    for obj in record["objects"]:
        colours[obj.cell] = 1 + list(synthetic.COLOURS).index(obj.colour)
    return colours


def readout(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, processor = builtin.load(args.checkpoint)
    records = builtin.task_of(args.checkpoint).dataset(args.split, args.train + args.test, seed=args.seed)
    states = last_position_states(model, processor, records, args.batch_size)
    answers = sorted({r["answer"] for r in records})
    targets = {"answer": torch.tensor([answers.index(r["answer"]) for r in records]),
               "cells": torch.tensor([cell_colours(r) for r in records])}
    layers = [{"layer": layer, **{name: linear_readout(states[:, layer], y, args.train) for name, y in targets.items()}}
              for layer in range(states.shape[1])]
    return {"layers": layers, "majority": {name: majority(y, args.train) for name, y in targets.items()},
            "meta": {"checkpoint": args.checkpoint or "builtin", "depth": states.shape[1] - 1, "train": args.train,
                     "test": args.test, "split": args.split, "seed": args.seed,
                     "seconds": time.perf_counter() - started, "torch": torch.__version__,
                     "command": "python benchmarks/answer_readout.py " + " ".join(args.argv)}}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="built-in model name or folder (default: the grounded model)")
    p.add_argument("--train", type=int, default=1500, help="records the readouts are fitted on")
    p.add_argument("--test", type=int, default=500, help="records they are scored on")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=7, help="dataset seed (7: records no other report uses)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--json", type=Path, default=None, help="results")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = readout(args)
    chance = results["majority"]
    print(f"{'after layer':>11}  {'answer':>7}  {'cells':>7}   (most common class: answer {chance['answer']:.1%}, "
          f"cells {chance['cells']:.1%})")
    for row in results["layers"]:
        print(f"{row['layer']:>11}  {row['answer']:>7.1%}  {row['cells']:>7.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
