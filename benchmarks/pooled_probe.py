"""Depth probe at pooled resolution, for models trained on average-pooled visual tokens only.

    python benchmarks/pooled_probe.py --state RUN/resume.pt --task relational --factor 4 --keep 2 \\
        --n 200 --json probe.json

The stage-2 steps of ``python -m fvlm.builtin.train`` at a pooling factor ``f`` (``--curriculum f:N``)
train the language model on ``(24 / f)^2`` pooled visual tokens; such a model is not meant for the
576 tokens of ``generate``, so :mod:`depth_probe` cannot measure it. This probe feeds the same pooled
sequence as training (:func:`fvlm.builtin.train.pooled_inputs`), runs the decoder layers one by one
and, after layer ``l`` (``l = 0``: before the first), keeps ``k`` of the pooled visual tokens:
``random`` ones, or ``oracle`` ones (the pooled cells holding most patches of the objects the question
is about, then random ones). It reports how often the first answer token is the argmax (teacher
forced), overall and per question kind, against keeping every token.
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

from fvlm.adapters import adapter_for  # noqa: E402
from fvlm.builtin import model as M  # noqa: E402
from fvlm.builtin import train as T  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from depth_probe import save_depth_figure  # noqa: E402


def load_state(path: Path, task: str, without: tuple[str, ...] = ()):
    """``(model, processor)`` from a checkpoint folder or a ``{"model": state_dict}`` file of ``task``
    (the decoder depth is read from the state; ``without``: words of the task's vocabulary the state
    was trained without)."""
    if path.is_dir():
        from fvlm.builtin import load

        return load(path)
    state = torch.load(path, map_location="cpu")["model"]
    generator, _, sizes = T.TASKS[task]
    processor = M.build_processor(M.build_tokenizer([w for w in generator.vocabulary() if w not in without]))
    depth = len({k.split(".")[3] for k in state if k.startswith("model.language_model.layers.")})
    model = M.build_model(M.build_config(processor.tokenizer, **{**sizes, "text_layers": depth}))
    model.load_state_dict(state)
    return model.eval(), processor


def oracle_cells(record: dict, factor: int, side: int = 24) -> list[int]:
    """Per pooled cell, how many of its patches belong to the objects the question is about."""
    from fvlm.builtin import synthetic

    owner = synthetic.patch_owner(record["objects"])
    targets = {record["objects"].index(o) for o in record["target"]}
    cells = [0] * (side // factor) ** 2
    for patch, obj in enumerate(owner):
        if obj in targets:
            row, col = divmod(patch, side)
            cells[(row // factor) * (side // factor) + col // factor] += 1
    return cells


@torch.no_grad()
def probe(model, processor, records: list[dict], factor: int, keeps: list[int], seed: int = 0) -> dict:
    """``{"all": hits, "random/k/l": hits, "oracle/k/l": hits}`` (per-record booleans as lists)."""
    tok = processor.tokenizer
    encoded = [T.encode_conversation(tok, [(r["question"], r["answer"])]) for r in records]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(records), width), tok.pad_token_id)
    labels = torch.full_like(ids, -100)
    for b, (i, lab) in enumerate(encoded):  # right-padded: padding comes after every query position
        ids[b, : len(i)], labels[b, : len(lab)] = torch.tensor(i), torch.tensor(lab)
    answer_at = (labels != -100).int().argmax(dim=1)
    answers = ids[torch.arange(len(records)), answer_at]
    batch = {"input_ids": ids, "labels": labels, "image_index": torch.arange(len(records)),
             "pixel_values": T._pixels(processor, records)}
    inputs, positions, _, first = T.pooled_inputs(model, batch, factor)
    m = inputs.shape[1] - width + model.config.image_seq_length  # pooled visual tokens
    query = answer_at - 1 - (model.config.image_seq_length - m)
    oracle = torch.tensor([oracle_cells(r, factor) for r in records], dtype=torch.float)
    for k in keeps:
        if not 0 < k <= m:
            raise SystemExit(f"--keep {k}: expected 1..{m} (the pooled visual tokens at factor {factor})")
    return probe_rows(model, inputs, positions, query, torch.full((len(records),), first), m, answers, oracle,
                      keeps, seed)


def probe_rows(model, embeds: torch.Tensor, positions: torch.Tensor, query: torch.Tensor, start: torch.Tensor,
               span: int, answers: torch.Tensor, oracle: torch.Tensor, keeps: list[int], seed: int = 0) -> dict:
    """``{"all": hits, "random/k/l": hits, "oracle/k/l": hits}``: is the argmax at position ``query``
    of each row ``answers``, with the decoder layers run one by one on ``embeds`` and, from layer ``l``
    on, only ``k`` of the row's ``span`` visual tokens (from ``start``) kept: the top ``k`` of seeded
    uniform noise (``random``), plus ``oracle`` (``oracle``)."""
    adapter, lm = adapter_for(model), model.model.language_model
    rows = len(embeds)

    def hits(layer: int | None, kind: str = "", k: int = 0) -> list[bool]:
        h, pos, q = embeds, positions, query
        for i in range(len(lm.layers)):
            if i == layer:
                score = torch.rand(rows, span, generator=torch.Generator().manual_seed(seed))
                if kind == "oracle":
                    score = score + oracle
                kept = score.topk(k, dim=1).indices.sort(dim=1).values
                every = torch.arange(h.shape[1])
                keep = torch.stack([torch.cat([every[:s], kept[b] + s, every[s + span:]])
                                    for b, s in enumerate(start.tolist())])
                h = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
                pos, q = pos.gather(1, keep), q - (span - k)
            h = adapter.run_layer(i, h, {"position_embeddings": lm.rotary_emb(h, pos), "position_ids": pos})
        logits = model.lm_head(lm.norm(h)[torch.arange(rows), q])
        return (logits.argmax(-1) == answers).tolist()

    out = {"all": hits(None)}
    for k in keeps:
        for layer in range(len(lm.layers)):
            for kind in ("random", "oracle"):
                out[f"{kind}/{k}/{layer}"] = hits(layer, kind, k)
    return out


def summary(hits: dict, records: list[dict]) -> dict:
    kinds = sorted({r["kind"] for r in records})
    return {name: {"all": sum(v) / len(v),
                   **{kd: sum(x for x, r in zip(v, records) if r["kind"] == kd) / sum(r["kind"] == kd for r in records)
                      for kd in kinds}}
            for name, v in hits.items()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, s = results["meta"], results["summary"]
    layers = list(range(meta["depth"]))
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    ax.axhline(100 * s["all"]["all"], color="black", linestyle="--", linewidth=1, label="keep-all")
    for k in meta["keep"]:
        for kind, style in (("random", ":"), ("oracle", "-")):
            ax.plot(layers, [100 * s[f"{kind}/{k}/{l}"]["all"] for l in layers], linestyle=style, marker="o",
                    label=f"{kind}, {k} of {(24 // meta['factor']) ** 2} pooled tokens")
    save_depth_figure(fig, ax, layers, "first answer token correct (%)",
                      f"{meta['state']}: {meta['depth']} layers, pooled x{meta['factor']}, {meta['n']} held-out records",
                      path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", type=Path, required=True, help="checkpoint folder or training state file (resume.pt)")
    p.add_argument("--task", default="relational", choices=sorted(T.TASKS), help="task of a state file")
    p.add_argument("--vocabulary-without", nargs="+", default=[], metavar="WORD",
                   help="words of the task's vocabulary a state file was trained without (older listings)")
    p.add_argument("--factor", type=int, default=4, help="pooling factor the model was trained at")
    p.add_argument("--keep", type=int, nargs="+", default=[2], help="pooled visual tokens kept")
    p.add_argument("--n", type=int, default=200, help="held-out records")
    p.add_argument("--split", default="val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: accuracy by pruning point (needs matplotlib)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, processor = load_state(args.state, args.task, tuple(args.vocabulary_without))
    records = T.TASKS[args.task][0].dataset(args.split, args.n, seed=args.seed)
    results = {"summary": summary(probe(model, processor, records, args.factor, args.keep, args.seed), records),
               "meta": {"state": args.state.name if args.state.is_dir() else args.state.parent.name,
                        "task": args.task, "factor": args.factor, "keep": args.keep, "n": args.n,
                        "split": args.split, "depth": model.config.text_config.num_hidden_layers,
                        "seconds": round(time.perf_counter() - started, 1)}}
    s = results["summary"]
    print(f"keep-all: {s['all']['all']:.1%}")
    for k in args.keep:
        for kind in ("random", "oracle"):
            print(f"{kind} {k} after layer 0..{results['meta']['depth'] - 1}: "
                  + " ".join(f"{s[f'{kind}/{k}/{l}']['all']:.2f}" for l in range(results["meta"]["depth"])))
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
