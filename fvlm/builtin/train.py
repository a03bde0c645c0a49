"""Train the built-in LLaVA model on the synthetic task and save it as a Hugging Face checkpoint.

    python -m fvlm.builtin.train --out fvlm/builtin/checkpoint          # the shipped checkpoint
    python -m fvlm.builtin.train --out /tmp/smoke --smoke               # 2 steps of a tiny variant

Plain PyTorch on the CPU, everything seeded. Each training sequence is a multi-turn LLaVA-1.5
conversation about one image (``USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...``),
so the 576 visual tokens are paid for once per several answers; the loss is the cross-entropy of
the answer tokens and their ``</s>`` only. A small auxiliary head on the vision tower's pooled CLS
output predicts which colour-shape pairs the image holds and how many objects of each colour and
shape, like the image-level objective that trains CLIP's CLS token: CLS attention is then about
the objects, which the CLS-attention selectors (VisionZip) rely on. The head is not saved.

The output folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the
tokenizer and processor files and ``training.json`` (settings, wall time, accuracies per split).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from fvlm.builtin import model as M
from fvlm.builtin import synthetic

ATTRIBUTES = [(c, s) for c in synthetic.COLOURS for s in synthetic.SHAPES]


def encode_conversation(tokenizer, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except on answers and their ``</s>``) of a multi-turn conversation.

    The first turn is exactly the tokenisation of the single-turn inference prompt (:func:`M.prompt`).
    """
    def words(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    image_id = tokenizer.convert_tokens_to_ids(M.IMAGE)
    ids = [tokenizer.bos_token_id]
    labels = [-100]
    for turn, (question, answer) in enumerate(qa):
        text = M.prompt(question) if turn == 0 else f"USER: {question} ASSISTANT:"
        part = words(text)
        if turn == 0:
            at = part.index(image_id)
            part = part[:at] + [image_id] * M.NUM_PATCHES + part[at + 1:]
        target = words(answer) + [tokenizer.eos_token_id]
        ids += part + target
        labels += [-100] * len(part) + target
    return ids, labels


def aux_targets(objects) -> torch.Tensor:
    """Presence of every colour-shape pair, then object counts per colour and per shape."""
    present = [float(any((o.colour, o.shape) == pair for o in objects)) for pair in ATTRIBUTES]
    colours = [float(sum(o.colour == c for o in objects)) for c in synthetic.COLOURS]
    shapes = [float(sum(o.shape == s for o in objects)) for s in synthetic.SHAPES]
    return torch.tensor(present + colours + shapes)


COLOUR_IDS = {c: i + 1 for i, c in enumerate(synthetic.COLOURS)}  # 0: background
SHAPE_IDS = {s: i + 1 for i, s in enumerate(synthetic.SHAPES)}


def patch_targets(objects) -> torch.Tensor:
    """Per patch ``[576, 2]``: colour id and shape id of the object covering it (0, 0 on background)."""
    owner = synthetic.patch_owner(objects)
    return torch.tensor([(COLOUR_IDS[objects[o].colour], SHAPE_IDS[objects[o].shape]) if o >= 0 else (0, 0)
                         for o in owner])


def make_batch(processor, indices: list[int], seed: int, questions: int) -> dict:
    tokenizer = processor.tokenizer
    scenes = [synthetic.training_scene(i, seed=seed, questions=questions) for i in indices]
    encoded = [encode_conversation(tokenizer, s["qa"]) for s in scenes]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, (ids, lab) in enumerate(encoded):  # right padding for training
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attention_mask[b, : len(ids)] = 1
    pixel_values = processor.image_processor([s["image"] for s in scenes], return_tensors="pt")["pixel_values"]
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
        "labels": labels, "aux": torch.stack([aux_targets(s["objects"]) for s in scenes]),
        "patches": torch.stack([patch_targets(s["objects"]) for s in scenes]),
    }


@torch.no_grad()
def evaluate(model, processor, split: str, n: int, batch_size: int = 16, seed: int = 0) -> dict:
    """Greedy-decoding accuracy on ``n`` records of ``split``: ``{"n", "accuracy", "per_kind"}``."""
    from fvlm.builtin import answer

    model.eval()
    records = synthetic.dataset(split, n, seed=seed)
    answers = answer(model, processor, [r["image"] for r in records], [r["question"] for r in records], batch_size)
    correct: dict[str, list[int]] = {}
    for r, a in zip(records, answers):
        c = correct.setdefault(r["kind"], [0, 0])
        c[0] += int(a == r["answer"])
        c[1] += 1
    hits = sum(c for c, _ in correct.values())
    return {"n": n, "accuracy": hits / n, "per_kind": {k: round(c / t, 4) for k, (c, t) in sorted(correct.items())}}


def init_2d_positions(model) -> None:
    """Initialise the vision tower's learned position embeddings with 2-D sine-cosine values.

    Half of the channels encode the patch row, half the column (CLS: zeros), scaled to the size of the
    patch embeddings. The embeddings stay trainable; the start only saves steps on "where" questions.
    """
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    table = embeddings.position_embedding.weight
    dim = table.shape[1]
    side = int(round((table.shape[0] - 1) ** 0.5))
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter)))
    coords = torch.arange(side, dtype=torch.float32)
    angles = coords[:, None] * freqs[None]  # [side, quarter]
    enc = torch.cat([angles.sin(), angles.cos()], dim=1)  # [side, 2 * quarter]
    rows = enc[:, None, :].expand(side, side, -1)
    cols = enc[None, :, :].expand(side, side, -1)
    grid = torch.cat([rows, cols], dim=-1).reshape(side * side, -1)
    with torch.no_grad():
        table.zero_()
        table[1:, : grid.shape[1]] = grid * 0.5


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def pooled_forward(model, batch: dict, factor: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels with the visual span average-pooled ``factor x factor`` (training curriculum).

    Pooled tokens keep the position id of their group's top-left patch and the text after the
    image keeps its original position ids, so the rotary geometry is that of the full sequence.
    Needs every sample's image span at the same offset (true for the conversations built here).
    """
    image_id = model.config.image_token_index
    ids = batch["input_ids"]
    first = int((ids[0] == image_id).nonzero()[0])
    n = model.config.image_seq_length
    side = int(round(n ** 0.5))
    if not bool((ids[:, first : first + n] == image_id).all()):
        raise ValueError("pooled_forward needs the image span at the same offset in every sample")
    features = model.model.get_image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    features = torch.stack(list(features))  # [B, n, D]
    bsz, _, dim = features.shape
    grid = features.reshape(bsz, side // factor, factor, side // factor, factor, dim)
    pooled = grid.mean(dim=(2, 4)).reshape(bsz, -1, dim)
    rows = torch.arange(0, side, factor)
    image_pos = (rows[:, None] * side + rows[None, :]).reshape(-1) + first
    embeds = model.get_input_embeddings()(ids)
    inputs = torch.cat([embeds[:, :first], pooled.to(embeds.dtype), embeds[:, first + n :]], dim=1)
    length = ids.shape[1]
    positions = torch.cat([torch.arange(first), image_pos, torch.arange(first + n, length)])
    hidden = model.model.language_model(inputs_embeds=inputs, position_ids=positions[None].expand(bsz, -1)).last_hidden_state
    labels = batch["labels"]
    labels = torch.cat([labels[:, :first], labels.new_full((bsz, pooled.shape[1]), -100), labels[:, first + n :]], dim=1)
    return model.lm_head(hidden), labels


class VisionHeads(nn.Module):
    """Training-only heads on the vision tower (not saved): the CLS-level and patch-level objectives.

    ``image``: presence of every colour-shape pair (BCE) and object counts per colour and per shape
    (MSE), from the pooled CLS output. ``patch``: for every patch of the layer that feeds the
    projector, object vs background (BCE), and the colour and shape of the object (cross-entropy on
    object patches only) - dense labels standing in for the pretraining a real CLIP tower has had.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.n_pairs, self.n_colours, self.n_shapes = len(ATTRIBUTES), len(synthetic.COLOURS), len(synthetic.SHAPES)
        self.image = nn.Linear(hidden, self.n_pairs + self.n_colours + self.n_shapes)
        self.patch = nn.Linear(hidden, 1 + self.n_colours + self.n_shapes)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, aux: torch.Tensor, targets: torch.Tensor) -> dict:
        f = nn.functional
        image = self.image(cls)
        n = self.n_pairs
        dense = self.patch(patches)
        obj = targets[..., 0] > 0
        losses = {
            "pairs": f.binary_cross_entropy_with_logits(image[:, :n], aux[:, :n]),
            "counts": f.mse_loss(image[:, n:], aux[:, n:]),
            "object": f.binary_cross_entropy_with_logits(dense[..., 0], obj.float()),
            "colour": f.cross_entropy(dense[..., 1 : 1 + self.n_colours][obj], targets[..., 0][obj] - 1),
            "shape": f.cross_entropy(dense[..., 1 + self.n_colours :][obj], targets[..., 1][obj] - 1),
        }
        with torch.no_grad():
            losses["shape_acc"] = (dense[..., 1 + self.n_colours :][obj].argmax(-1) == targets[..., 1][obj] - 1).float().mean()
        return losses


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def _vision_loss(losses: dict) -> torch.Tensor:
    return sum(v for k, v in losses.items() if not k.endswith("_acc"))


def _log(log: list, entry: dict) -> None:
    entry = {k: round(float(v.detach() if isinstance(v, torch.Tensor) else v), 4)
             if not isinstance(v, (int, str)) else v for k, v in entry.items()}
    log.append(entry)
    print(json.dumps(entry), flush=True)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = M.build_processor()
    processor.tokenizer.padding_side = "left"  # for evaluation; training batches are built by hand
    sizes = M.SMOKE_SIZES if args.smoke else M.DEFAULT_SIZES
    config = M.build_config(processor.tokenizer, **sizes)
    model = M.build_model(config, seed=args.seed)
    if args.init_2d_positions:
        init_2d_positions(model)
    heads = VisionHeads(config.vision_config.hidden_size)
    tower = model.model.vision_tower
    log: list[dict] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()

    # Stage 1: the vision tower alone on the dense objectives (cheap: no language model).
    optimizer = _optimizer([*tower.parameters(), *heads.parameters()], args.lr, args.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cached = Path(args.vision_cache) if args.vision_cache else None
    if cached is not None and cached.is_file():
        state = torch.load(cached)
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        print(f"stage 1 loaded from {cached}", flush=True)
    for step in range(0 if cached is not None and cached.is_file() else args.vision_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vision_steps, args.lr, args.warmup)
        first = 10_000_000 + step * args.vision_batch  # scenes disjoint from stage 2's
        batch = make_batch(processor, list(range(first, first + args.vision_batch)), args.seed, 1)
        out = tower(batch["pixel_values"], output_hidden_states=True)
        layer = config.vision_feature_layer
        losses = heads(out.pooler_output, out.hidden_states[layer][:, 1:], batch["aux"], batch["patches"])
        loss = _vision_loss(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.vision_steps - 1:
            _log(log, {"stage": "vision", "step": step, "loss": loss, "shape_acc": losses["shape_acc"],
                       "seconds": round(time.perf_counter() - start, 1)})

    if cached is not None and not cached.is_file():
        torch.save({"tower": tower.state_dict(), "heads": heads.state_dict()}, cached)

    # Stage 2: the whole model on multi-turn conversations, the vision objectives kept as auxiliaries.
    # The first `pooled_steps` steps show the language model 2 x 2-average-pooled visual tokens (144,
    # at their original position ids): a 4x shorter visual span, so attention learns to find objects
    # 4x sooner and steps cost a third; the rest use all 576 tokens (the real model).
    seen = {}
    hooks = [
        tower.register_forward_hook(lambda m, a, out: seen.__setitem__("cls", out.pooler_output)),
        model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.__setitem__("patches", a[0])),
    ]
    optimizer = _optimizer([*model.parameters(), *heads.parameters()], args.lr, args.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = args.pooled_steps + args.steps
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        batch = make_batch(processor, list(range(step * args.batch, (step + 1) * args.batch)), args.seed, args.questions)
        # Right padding needs no attention mask: causal attention never lets a real token see the
        # pads after it (and without a mask SDPA takes its fast causal kernel on the CPU).
        if step < args.pooled_steps:
            logits, labels = pooled_forward(model, batch, factor=2)
        else:
            logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
            labels = batch["labels"]
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        loss_qa = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        losses = heads(seen["cls"], seen["patches"], batch["aux"], batch["patches"])
        loss = loss_qa + args.aux_weight * _vision_loss(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            mask = labels != -100
            acc = (logits.argmax(-1)[mask] == labels[mask]).float().mean()
            _log(log, {"stage": "pooled" if step < args.pooled_steps else "vlm", "step": step, "loss": loss_qa, "vision": _vision_loss(losses),
                       "token_acc": acc, "seconds": round(time.perf_counter() - start, 1)})
        if args.eval_every and step and step % args.eval_every == 0:
            print(json.dumps({"step": step, "val": evaluate(model, processor, "val", args.eval_n)}), flush=True)
            model.train()
    train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    for hook in hooks:
        hook.remove()
    model.eval()

    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "sizes": sizes,
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "log": log}
    if args.eval_n:
        results["val"] = evaluate(model, processor, "val", args.eval_n)
        results["test"] = evaluate(model, processor, "test", args.test_n)
        print(json.dumps({"val": results["val"], "test": results["test"]}), flush=True)
    save(model, processor, Path(args.out), results)
    return results


def save(model, processor, out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(results, indent=1) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fvlm.builtin.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint)")
    p.add_argument("--vision-steps", type=int, default=300, help="stage 1: vision tower steps")
    p.add_argument("--vision-batch", type=int, default=16, help="stage 1: images per step")
    p.add_argument("--pooled-steps", type=int, default=300,
                   help="stage 2, first part: steps with 2 x 2-pooled visual tokens (curriculum)")
    p.add_argument("--steps", type=int, default=300, help="stage 2, second part: steps with all 576 visual tokens")
    p.add_argument("--batch", type=int, default=8, help="stage 2: images per step")
    p.add_argument("--questions", type=int, default=8, help="questions per image (conversation turns)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-2d-positions", dest="init_2d_positions", action="store_false",
                   help="keep HF's random init of the vision position embeddings")
    p.add_argument("--vision-cache", default=None, help="load stage 1 from this file if it exists, else save it there")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); 1 is fastest on a shared 2-core machine")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (0: off)")
    p.add_argument("--eval-n", type=int, default=200, help="validation records evaluated at the end (0: skip)")
    p.add_argument("--test-n", type=int, default=1000, help="held-out test records evaluated at the end")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, no evaluation (for CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.questions, args.eval_n, args.log_every, args.warmup = 2, 2, 2, 0, 1, 1
        args.vision_steps, args.vision_batch, args.pooled_steps = 2, 2, 1
    return args


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
