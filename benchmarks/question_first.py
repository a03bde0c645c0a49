"""Does the question placed before the image keep the visual tokens necessary after layer 1?

    python benchmarks/question_first.py --steps 500 --probe-every 100 --threads 2 --json qf.json

On the shipped model the question's words follow the image, so each word fetches what it names in
the first decoder layer and the visual tokens are not needed afterwards (see
`answer_readout.py`). With ``USER: {question} <image> ASSISTANT:`` no word of the question can
see the image and the position that predicts the answer can aim its first look only from the
second layer on. This script fine-tunes the shipped checkpoint on that layout (projector and
language model; the vision tower frozen, one question per sequence, ``--images`` scenes with
``--questions`` questions each per step) and every ``--probe-every`` steps probes it: the first
answer token, teacher forced, on ``--probe-n`` held-out records, unpruned and with ``k`` random or
oracle visual tokens (`fvlm.builtin.oracle.patch_order`) kept after each decoder layer.
``--layout image-first --steps 0`` probes the shipped model as it is (the control).
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
from fvlm.builtin import load, synthetic  # noqa: E402
from fvlm.builtin import model as M  # noqa: E402
from fvlm.builtin import train as T  # noqa: E402
from fvlm.builtin.oracle import patch_order  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pooled_probe import probe_rows, summary  # noqa: E402


def encode(tokenizer, question: str, answer: str, layout: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (answer and ``</s>`` only) of one question about one image."""
    prompt = M.prompt if layout == "image-first" else (lambda q: f"USER: {q} {M.IMAGE} ASSISTANT:")
    return T.encode_conversation(tokenizer, [(question, answer)], prompt)


def inputs(model, processor, pairs: list[tuple[str, str]], images: list, image_index: list[int], layout: str):
    """Right-padded ``(input_ids, labels, inputs_embeds, image_start)``: the visual features of
    ``images[image_index[b]]`` in the image span of sequence ``b``."""
    tok = processor.tokenizer
    encoded = [encode(tok, q, a, layout) for q, a in pairs]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    labels = torch.full_like(ids, -100)
    for b, (i, lab) in enumerate(encoded):
        ids[b, : len(i)], labels[b, : len(lab)] = torch.tensor(i), torch.tensor(lab)
    features = adapter_for(model).image_features(
        pixel_values=processor.image_processor(images, return_tensors="pt")["pixel_values"],
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    features = torch.stack(list(features))[torch.tensor(image_index)]
    is_image = ids == model.config.image_token_index
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(is_image[..., None], features.reshape(-1, features.shape[-1]).to(embeds.dtype))
    return ids, labels, embeds, is_image.int().argmax(dim=1)


def oracle_scores(records: list[dict]) -> torch.Tensor:
    """``(records, patches)``: above 2 for the patches of the objects a question is about, in
    `patch_order`'s order; 0 elsewhere (added to uniform noise, the top ``k`` are the oracle's picks)."""
    scores = torch.zeros(len(records), M.NUM_PATCHES)
    for b, r in enumerate(records):
        owner = synthetic.patch_owner(r["objects"])
        targets = {r["objects"].index(o) for o in r["target"]}
        n = sum(o in targets for o in owner)
        for rank, patch in enumerate(patch_order(r)[:n]):
            scores[b, patch] = 2.0 + (n - rank) / (n + 1)
    return scores


@torch.no_grad()
def probe(model, processor, records: list[dict], keeps: list[int], layout: str, seed: int = 0) -> dict:
    """``{"all": hits, "random/k/l": hits, "oracle/k/l": hits}``: per record, is the first answer token
    the argmax (teacher forced) unpruned, and with ``k`` visual tokens kept after decoder layer ``l``
    (`pooled_probe.probe_rows` at full resolution, each record's image span where its layout puts it)."""
    ids, labels, embeds, start = inputs(model, processor, [(r["question"], r["answer"]) for r in records],
                                        [r["image"] for r in records], list(range(len(records))), layout)
    answer_at = (labels != -100).int().argmax(dim=1)
    answers = ids[torch.arange(len(records)), answer_at]
    positions = torch.arange(ids.shape[1]).expand(len(records), -1)
    return probe_rows(model, embeds, positions, answer_at - 1, start, M.NUM_PATCHES, answers, oracle_scores(records),
                      keeps, seed)


def probe_summary(model, processor, args) -> dict:
    """Accuracy of every probe row, overall and per question kind, on ``--probe-n`` `val` records."""
    model.eval()
    records = synthetic.dataset("val", args.probe_n)
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(records), args.batch_size):
        for name, h in probe(model, processor, records[i:i + args.batch_size], args.keep, args.layout).items():
            hits.setdefault(name, []).extend(h)
    return summary(hits, records)


def finetune(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, processor = load(args.checkpoint)
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    log, probes = [], {}
    if args.steps == 0 or args.probe_every:
        probes[0] = probe_summary(model, processor, args)
        print(json.dumps({"step": 0, "probe": {k: round(v["all"], 3) for k, v in probes[0].items()}}), flush=True)
    for step in range(args.steps):
        model.train()
        tower.eval()
        for group in optimizer.param_groups:
            group["lr"] = T.lr_at(step, args.steps, args.lr, args.warmup)
        scenes = [synthetic.training_scene(args.first_scene + step * args.images + j, questions=args.questions,
                                           description=False) for j in range(args.images)]
        pairs = [qa for s in scenes for qa in s["qa"]]
        index = [j for j, s in enumerate(scenes) for _ in s["qa"]]
        _, labels, embeds, _ = inputs(model, processor, pairs, [s["image"] for s in scenes], index, args.layout)
        logits = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % 20 == 0:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - started)})
            print(json.dumps(log[-1]), flush=True)
        if args.probe_every and (step + 1) % args.probe_every == 0 or step + 1 == args.steps:
            probes[step + 1] = probe_summary(model, processor, args)
            print(json.dumps({"step": step + 1, "probe": {k: round(v["all"], 3) for k, v in probes[step + 1].items()}}),
                  flush=True)
    return {"probes": probes, "log": log,
            "meta": {"layout": args.layout, "steps": args.steps, "keep": args.keep, "probe_n": args.probe_n,
                     "seconds": time.perf_counter() - started, "torch": torch.__version__,
                     "command": "python benchmarks/question_first.py " + " ".join(args.argv)}}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="built-in model folder to start from (default: the shipped one)")
    p.add_argument("--layout", choices=("question-first", "image-first"), default="question-first")
    p.add_argument("--steps", type=int, default=500, help="fine-tuning steps (0: probe only)")
    p.add_argument("--images", type=int, default=8, help="scenes per step")
    p.add_argument("--questions", type=int, default=3, help="questions per scene (one sequence each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--first-scene", type=int, default=20_000_000, help="training scenes from this index on")
    p.add_argument("--probe-every", type=int, default=100, help="probe every N steps (0: at the end only)")
    p.add_argument("--probe-n", type=int, default=200, help="held-out val records per probe")
    p.add_argument("--keep", type=int, nargs="+", default=[32], help="visual tokens kept (of 576)")
    p.add_argument("--batch-size", type=int, default=25, help="records per probe forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--json", type=Path, default=None, help="results")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = finetune(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
