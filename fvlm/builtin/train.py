"""Train the built-in LLaVA model on the synthetic task and save it as a Hugging Face checkpoint.

    python -m fvlm.builtin.train --out fvlm/builtin/checkpoint          # the shipped checkpoint
    python -m fvlm.builtin.train --out /tmp/smoke --smoke               # a few steps of a tiny variant

Plain PyTorch on the CPU, everything seeded, two stages like LLaVA's (vision pretraining, then the
language side with the vision tower frozen):

1. *Vision tower* (the stand-in for CLIP pretraining): dense labels from the scene generator. Per
   patch of the layer that feeds the projector: object or background, the object's colour and
   shape, its layout cell, and whether it is the object's centre patch; per image, from the pooled
   CLS output: which colour-shape pairs occur and how many objects of each colour and shape (the
   image-level objective gives CLS attention a meaning, which VisionZip-style selectors rely on);
   and the same image-level targets from every patch (CLIP patch tokens carry global information
   too; without it counting stays near chance). These heads are not saved.
2. *Projector + language model*, vision tower frozen: single-turn LLaVA-1.5 prompts
   (``USER: <image>\n{question} ASSISTANT: {answer}</s>``), the loss on the answer tokens and
   ``</s>`` only. Besides the task's questions, every image comes with dense "listing" answers
   (``list the colours .`` -> ``top left red , top center empty , ...``, counts, colour-shape pairs)
   that make every listed token depend on one place or one attribute of the image: they teach the
   language model where to look far sooner than the questions alone. A curriculum first shows the
   language model the visual tokens average-pooled 4 x 4 (36 tokens), then 2 x 2 (144), then all
   576 (the real model); pooled tokens keep their original position ids. Full-resolution steps
   pack each image's questions and listings into one multi-turn conversation (questions first),
   so the 576 visual tokens are paid for once per image. They are needed: counts and yes / no
   answers learnt on pooled tokens come out miscalibrated on all 576.

Things that turned out to matter: the language model's ``initializer_range`` (0.08; with
Llama's 0.02 attention stays uniform over the visual tokens for hundreds of steps) and freezing the
vision tower in stage 2.

The output folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the
tokenizer and processor files and ``training.json`` (settings, wall and CPU time, accuracies).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from fvlm.adapters import adapter_for
from fvlm.builtin import model as M
from fvlm.builtin import relational, synthetic

ATTRIBUTES = [(c, s) for c in synthetic.COLOURS for s in synthetic.SHAPES]


def encode_conversation(tokenizer, qa: list[tuple[str, str]], prompt=M.prompt) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except on answers and their ``</s>``) of a multi-turn conversation.

    The first turn is exactly the tokenisation of the single-turn inference prompt (``prompt(question)``,
    one image token in it; default [`M.prompt`][fvlm.builtin.train.M.prompt]).
    """
    def words(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    image_id = tokenizer.convert_tokens_to_ids(M.IMAGE)
    ids = [tokenizer.bos_token_id]
    labels = [-100]
    for turn, (question, answer) in enumerate(qa):
        text = prompt(question) if turn == 0 else f"USER: {question} ASSISTANT:"
        part = words(text)
        if turn == 0:
            at = part.index(image_id)
            part = part[:at] + [image_id] * M.NUM_PATCHES + part[at + 1:]
        target = words(answer) + [tokenizer.eos_token_id]
        ids += part + target
        labels += [-100] * len(part) + target
    return ids, labels


def encode_isolated(tokenizer, qa: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Single-turn prompts about one image packed behind one copy of it: ids, labels, segments, positions.

    The shared prefix (``<s> USER : <image> x 576``) is segment 0; turn ``k`` (``{question}
    ASSISTANT : {answer} </s>``) is segment ``k`` and takes the position ids it has in the single-turn
    sequence. With the mask of `segment_mask` every turn sees the prefix and itself only, so
    each is computed exactly as the single-turn sequence would be, without the other turns' answers.
    """
    def words(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    image_id = tokenizer.convert_tokens_to_ids(M.IMAGE)
    first = [tokenizer.bos_token_id] + words(M.prompt(qa[0][0]))
    at = first.index(image_id)
    ids = first[: at] + [image_id] * M.NUM_PATCHES
    labels, segments, positions = [-100] * len(ids), [0] * len(ids), list(range(len(ids)))
    for turn, (question, answer) in enumerate(qa, start=1):
        part = words(M.prompt(question))
        part = part[part.index(image_id) + 1:]
        target = words(answer) + [tokenizer.eos_token_id]
        ids += part + target
        labels += [-100] * len(part) + target
        segments += [turn] * (len(part) + len(target))
        positions += range(at + M.NUM_PATCHES, at + M.NUM_PATCHES + len(part) + len(target))
    return ids, labels, segments, positions


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` boolean attention mask: causal, and a token of segment ``s > 0`` sees segment 0
    and ``s`` only (segment 0 sees itself)."""
    same = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=segments.device).tril()
    return (same & causal)[:, None]


def aux_targets(objects) -> torch.Tensor:
    """Presence of every colour-shape pair, then object counts per colour and per shape."""
    present = [float(any((o.colour, o.shape) == pair for o in objects)) for pair in ATTRIBUTES]
    colours = [float(sum(o.colour == c for o in objects)) for c in synthetic.COLOURS]
    shapes = [float(sum(o.shape == s for o in objects)) for s in synthetic.SHAPES]
    return torch.tensor(present + colours + shapes)


_SIDE = synthetic.IMAGE_SIZE // synthetic.PATCH
#: The 3 x 3 layout cell of every patch (row-major), a target of the patch head.
CELLS = torch.tensor([(r * 3 // _SIDE) * 3 + (c * 3 // _SIDE) for r in range(_SIDE) for c in range(_SIDE)])[None]
COLOUR_IDS = {c: i + 1 for i, c in enumerate(synthetic.COLOURS)}  # 0: background
SHAPE_IDS = {s: i + 1 for i, s in enumerate(synthetic.SHAPES)}


def patch_targets(objects) -> torch.Tensor:
    """Per patch ``[576, 3]``: colour id and shape id of the object covering it (0, 0 on background),
    and 1 on the centre patch of every object (one per object: what counting needs)."""
    owner = synthetic.patch_owner(objects)
    centres = set()
    for o in objects:
        x0, y0, x1, y1 = o.box
        centres.add(((y0 + y1) // 2 // synthetic.PATCH) * _SIDE + (x0 + x1) // 2 // synthetic.PATCH)
    return torch.tensor([(COLOUR_IDS[objects[o].colour], SHAPE_IDS[objects[o].shape], int(i in centres)) if o >= 0
                         else (0, 0, 0) for i, o in enumerate(owner)])


#: Kinds of the questions beyond one of each per image: the ones that need colour and shape bound
#: to one object (adversarial "no" answers, multiple choice by colour and shape) and counting.
HARD_KINDS = ("count", "exists", "choice")


#: The task each checkpoint is trained on: its question generator (``sample``, ``dataset``,
#: ``training_scene``, ``vocabulary``), the question kinds beyond one of each per image, and its sizes.
TASKS = {
    "grounded": (synthetic, HARD_KINDS, M.DEFAULT_SIZES),
    "relational": (relational, relational.KINDS, M.RELATIONAL_SIZES),
}


def _pixels(processor, scenes: list[dict]) -> torch.Tensor:
    return processor.image_processor([s["image"] for s in scenes], return_tensors="pt")["pixel_values"]


def vision_batch(processor, indices: list[int], seed: int, task: str = "grounded") -> dict:
    """Stage-1 batch for the scenes ``indices``: pixel values and the vision heads' targets."""
    scenes = [TASKS[task][0].training_scene(i, seed=seed, questions=0, description=False) for i in indices]
    return {"pixel_values": _pixels(processor, scenes),
            "aux": torch.stack([aux_targets(s["objects"]) for s in scenes]),
            "patches": torch.stack([patch_targets(s["objects"]) for s in scenes])}


def make_batch(processor, indices: list[int], seed: int, questions: int, listings: bool = True,
               packed: bool = False, task: str = "grounded", isolated: bool = False,
               kinds: tuple[str, ...] | None = None) -> dict:
    """Stage-2 batch for the scenes ``indices``, right-padded; ``image_index`` maps sequences to images.

    By default every (question, answer) is its own single-turn sequence about its image (exactly
    the inference format). ``packed``: one multi-turn conversation per image, the questions first
    and the listings last (so no question can be answered from a listing): the 576 visual tokens
    are paid for once per image, for the expensive full-resolution steps. ``isolated``: one sequence
    per image too, but each turn sees only the image and itself (`encode_isolated`; the batch
    carries ``segments`` and ``position_ids``): single-turn training at the cost of a packed one.
    ``kinds``: the question kinds beyond one of each (default: the task's).
    """
    tokenizer = processor.tokenizer
    generator, default_kinds, _ = TASKS[task]
    kinds = kinds or default_kinds
    scenes = [generator.training_scene(i, seed=seed, questions=questions, description=listings, extra_kinds=kinds)
              for i in indices]
    encoded, image_index = [], []
    for k, scene in enumerate(scenes):
        if isolated:
            encoded.append(encode_isolated(tokenizer, scene["qa"]))
            image_index.append(k)
            continue
        for conversation in ([scene["qa"]] if packed else [[qa] for qa in scene["qa"]]):
            encoded.append(encode_conversation(tokenizer, conversation))
            image_index.append(k)
    width = max(len(e[0]) for e in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for b, (ids, lab, *_) in enumerate(encoded):  # right padding: causal attention needs no mask then
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
    batch = {"input_ids": input_ids, "labels": labels, "image_index": torch.tensor(image_index),
             "pixel_values": _pixels(processor, scenes)}
    if isolated:  # padding: a segment of its own per position (sees the prefix and itself)
        batch["segments"] = torch.arange(width).add(1_000_000).expand(len(encoded), -1).clone()
        batch["position_ids"] = torch.arange(width).expand(len(encoded), -1).clone()
        for b, (ids, _, segments, positions) in enumerate(encoded):
            batch["segments"][b, : len(ids)] = torch.tensor(segments)
            batch["position_ids"][b, : len(ids)] = torch.tensor(positions)
    return batch


@torch.no_grad()
def evaluate(model, processor, split: str, n: int, batch_size: int = 16, seed: int = 0, task: str = "grounded") -> dict:
    """Greedy-decoding accuracy on ``n`` records of ``split``: ``{"n", "accuracy", "per_kind"}``."""
    from fvlm.builtin import answer

    model.eval()
    records = TASKS[task][0].dataset(split, n, seed=seed)
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


def pooled_inputs(model, batch: dict, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Input embeddings, position ids, attention mask (``None``: causal) of ``batch`` with the visual
    tokens average-pooled ``factor x factor``, and the offset of the image span.

    The vision tower runs once per image (several sequences share an image). Pooled tokens keep the
    position id of their group's top-left patch and the text after the image keeps its original
    position ids, so the rotary geometry is that of the full sequence. Needs every sequence's image
    span at the same offset (true for the prompts built here).
    """
    image_id = model.config.image_token_index
    ids = batch["input_ids"]
    first = int((ids[0] == image_id).nonzero()[0])
    n = model.config.image_seq_length
    side = int(round(n ** 0.5))
    if not bool((ids[:, first : first + n] == image_id).all()):
        raise ValueError("lm_forward needs the image span at the same offset in every sequence")
    features = adapter_for(model).image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    features = torch.stack(list(features))  # [images, n, D]
    dim = features.shape[-1]
    rows = torch.arange(0, side, factor)
    if factor > 1:
        grid = features.reshape(len(features), side // factor, factor, side // factor, factor, dim)
        features = grid.mean(dim=(2, 4)).reshape(len(features), -1, dim)
    image_pos = (rows[:, None] * side + rows[None, :]).reshape(-1) + first
    features = features[batch["image_index"]]
    bsz, length = ids.shape
    embeds = model.get_input_embeddings()(ids)
    inputs = torch.cat([embeds[:, :first], features.to(embeds.dtype), embeds[:, first + n :]], dim=1)
    given = batch.get("position_ids", torch.arange(length).expand(bsz, -1))
    positions = torch.cat([given[:, :first], image_pos.expand(bsz, -1), given[:, first + n :]], dim=1)
    mask = None
    if "segments" in batch:
        seg = batch["segments"]
        mask = segment_mask(torch.cat([seg[:, :first], seg.new_zeros(bsz, features.shape[1]), seg[:, first + n :]], 1))
    return inputs, positions, mask, first


def lm_forward(model, batch: dict, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``batch`` with the visual tokens average-pooled ``factor x factor``
    (`pooled_inputs`; ``factor=1`` is the model's own forward): a curriculum, as a short visual
    span is cheap and easy to search."""
    inputs, positions, mask, first = pooled_inputs(model, batch, factor)
    hidden = model.model.language_model(inputs_embeds=inputs, position_ids=positions, attention_mask=mask).last_hidden_state
    labels = batch["labels"]
    n, pooled = model.config.image_seq_length, inputs.shape[1] - labels.shape[1] + model.config.image_seq_length
    labels = torch.cat([labels[:, :first], labels.new_full((len(labels), pooled), -100), labels[:, first + n :]], dim=1)
    return model.lm_head(hidden), labels


class VisionHeads(nn.Module):
    """Training-only heads on the vision tower (not saved): the CLS-level and patch-level objectives.

    ``image``: presence of every colour-shape pair (BCE) and object counts per colour and per shape
    (MSE), from the pooled CLS output. ``patch``: for every patch of the layer that feeds the
    projector, object vs background (BCE), and the colour and shape of the object (cross-entropy on
    object patches only), the layout cell, the object's centre patch - dense labels standing in for
    the pretraining a real CLIP tower has had. ``scene``: every patch also predicts the image-level
    targets (pairs and counts), the way CLIP patch tokens carry global information: counting and
    existence questions can then be answered from few tokens, region questions cannot. Without
    ``scene`` (``--local-patches``) a patch describes only its own object and place.
    """

    def __init__(self, hidden: int, scene: bool = True):
        super().__init__()
        self.use_scene = scene
        self.n_pairs, self.n_colours, self.n_shapes = len(ATTRIBUTES), len(synthetic.COLOURS), len(synthetic.SHAPES)
        self.image = nn.Linear(hidden, self.n_pairs + self.n_colours + self.n_shapes)
        self.patch = nn.Linear(hidden, 1 + self.n_colours + self.n_shapes + 9 + 1)
        self.scene = nn.Linear(hidden, self.n_pairs + self.n_colours + self.n_shapes)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, aux: torch.Tensor, targets: torch.Tensor) -> dict:
        f = nn.functional
        image = self.image(cls)
        n = self.n_pairs
        dense = self.patch(patches)
        scene = self.scene(patches)
        everywhere = aux[:, None].expand(-1, scene.shape[1], -1)
        obj = targets[..., 0] > 0
        losses = {
            "pairs": f.binary_cross_entropy_with_logits(image[:, :n], aux[:, :n]),
            "counts": f.mse_loss(image[:, n:], aux[:, n:]),
            "object": f.binary_cross_entropy_with_logits(dense[..., 0], obj.float()),
            "colour": f.cross_entropy(dense[..., 1 : 1 + self.n_colours][obj], targets[..., 0][obj] - 1),
            "shape": f.cross_entropy(dense[..., 1 + self.n_colours : 1 + self.n_colours + self.n_shapes][obj],
                                     targets[..., 1][obj] - 1),
            "cell": f.cross_entropy(dense[..., -10:-1].flatten(0, 1), CELLS.expand(len(dense), -1).flatten()),
            "centre": f.binary_cross_entropy_with_logits(dense[..., -1], targets[..., 2].float(),
                                                         pos_weight=torch.tensor(20.0)),
        }
        if self.use_scene:
            losses["scene_pairs"] = f.binary_cross_entropy_with_logits(scene[..., :n], everywhere[..., :n])
            losses["scene_counts"] = f.mse_loss(scene[..., n:], everywhere[..., n:])
        with torch.no_grad():
            shape = dense[..., 1 + self.n_colours : 1 + self.n_colours + self.n_shapes][obj]
            losses["shape_acc"] = (shape.argmax(-1) == targets[..., 1][obj] - 1).float().mean()
            counted = scene[..., n:] if self.use_scene else image[:, None, n:]
            losses["count_acc"] = (counted.round() == everywhere[..., n:]).float().mean()
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
    generator, _, task_sizes = TASKS[args.task]
    processor = M.build_processor(M.build_tokenizer(generator.vocabulary()))
    processor.tokenizer.padding_side = "left"  # for evaluation; training batches are built by hand
    sizes = M.SMOKE_SIZES if args.smoke else task_sizes
    config = M.build_config(processor.tokenizer, **sizes)
    resume = Path(args.out) / "resume.pt"
    resuming = bool(args.save_every) and resume.is_file()
    if args.init or resuming:  # stage 1 is in the checkpoint (or in the resume file)
        args.vision_steps, args.vision_cache = 0, None
    if args.init:  # continue from a checkpoint of this script: stage 2 only, on scenes it has not seen
        from fvlm.builtin import load

        model, _ = load(args.init)
    else:
        model = M.build_model(config, seed=args.seed)
        if args.init_2d_positions:
            init_2d_positions(model)
    heads = VisionHeads(config.vision_config.hidden_size, scene=not args.local_patches)
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
        batch = vision_batch(processor, list(range(first, first + args.vision_batch)), args.seed, args.task)
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
                       "count_acc": losses["count_acc"],
                       "seconds": round(time.perf_counter() - start, 1)})

    if cached is not None and not cached.is_file():
        torch.save({"tower": tower.state_dict(), "heads": heads.state_dict()}, cached)

    # Stage 2: projector + language model, the vision tower frozen (as in LLaVA; tuning it with the
    # language loss of a random language model wrecks its features), with the pooling curriculum.
    vision_seconds = time.perf_counter() - start
    eval_seconds = 0.0
    tower.requires_grad_(False)
    tower.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, args.lr, args.weight_decay)
    factors = [f for f, n in args.curriculum for _ in range(n)]  # pooling factor of every step
    total = len(factors)
    first_step = 0
    if resuming:  # a stopped run goes on where it saved (batches depend on the step only)
        state = torch.load(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, log[:], eval_seconds = state["step"], state["log"], state["eval_seconds"]
        start -= state["seconds"]
        print(f"resumed at stage-2 step {first_step} from {resume}", flush=True)
    for step in range(first_step, total):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        factor = factors[step]
        first = args.first_scene + step * args.batch
        batch = make_batch(processor, list(range(first, first + args.batch)), args.seed,
                           args.questions, packed=factor == 1 and args.packed, task=args.task, isolated=args.isolated,
                           kinds=next((k for at, k in reversed(args.kinds) if at <= step), None) if args.kinds else None)
        logits, labels = lm_forward(model, batch, factor)
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == total - 1:
            mask = labels != -100
            acc = (logits.argmax(-1)[mask] == labels[mask]).float().mean()
            _log(log, {"stage": f"vlm/{factors[step]}", "step": step, "loss": loss,
                       "token_acc": acc, "seconds": round(time.perf_counter() - start, 1)})
        if args.eval_every and step and step % args.eval_every == 0:
            eval_start = time.perf_counter()
            val = evaluate(model, processor, "val", args.eval_n, task=args.task)
            print(json.dumps({"step": step, "val": val}), flush=True)
            model.train()
            tower.eval()
            eval_seconds += time.perf_counter() - eval_start
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1, "log": log,
                        "eval_seconds": eval_seconds, "seconds": time.perf_counter() - start}, resume)
    train_seconds = time.perf_counter() - start - eval_seconds
    cpu_seconds = time.process_time() - cpu_start
    tower.requires_grad_(True)
    model.eval()

    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "sizes": sizes,
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(train_seconds, 1), "vision_seconds": round(vision_seconds, 1),
               "train_cpu_seconds": round(cpu_seconds, 1), "periodic_eval_seconds": round(eval_seconds, 1), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "log": log}
    if args.eval_n:
        results["val"] = evaluate(model, processor, "val", args.eval_n, task=args.task)
        results["test"] = evaluate(model, processor, "test", args.test_n, task=args.task)
        print(json.dumps({"val": results["val"], "test": results["test"]}), flush=True)
    save(model, processor, Path(args.out), results)
    resume.unlink(missing_ok=True)
    return results


def save(model, processor, out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(results, indent=1) + "\n")


def _kinds(text: str) -> list[tuple[int, tuple[str, ...] | None]]:
    """``STEP:KIND+KIND,...`` (``all``: the task's kinds) from the given stage-2 step on."""
    out = []
    for part in text.split(","):
        at, _, names = part.partition(":")
        if not at.strip().isdigit() or not names:
            raise argparse.ArgumentTypeError(f"expected STEP:KIND+KIND,... (or STEP:all), got {text!r}")
        out.append((int(at), None if names == "all" else tuple(names.split("+"))))
    return sorted(out)


def _curriculum(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or p[0] not in (1, 2, 3, 4, 6, 8, 12, 24) or p[1] < 0 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected FACTOR:STEPS,... with FACTOR dividing 24, got {text!r}")
    return pairs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fvlm.builtin.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint)")
    p.add_argument("--task", choices=sorted(TASKS), default="grounded",
                   help="question generator: grounded (fvlm.builtin.synthetic, the default checkpoint) or "
                        "relational (fvlm.builtin.relational: 8 decoder layers)")
    p.add_argument("--vision-steps", type=int, default=400, help="stage 1: vision tower steps")
    p.add_argument("--vision-batch", type=int, default=16, help="stage 1: images per step")
    p.add_argument("--curriculum", type=_curriculum, default="4:300,2:200,1:900",
                   help="stage 2 as FACTOR:STEPS,...: steps with the visual tokens average-pooled FACTOR x FACTOR "
                        "(1: all 576, the real model)")
    p.add_argument("--batch", type=int, default=8, help="stage 2: images per step")
    p.add_argument("--questions", type=int, default=10,
                   help="questions per image: one of each kind, the rest of the hard kinds (HARD_KINDS)")
    p.add_argument("--no-packed", dest="packed", action="store_false",
                   help="full-resolution steps: one single-turn sequence per question (default: one "
                        "multi-turn conversation per image)")
    p.add_argument("--kinds", type=_kinds, default=None,
                   help="question kinds from a stage-2 step on, as STEP:KIND+KIND,... (e.g. "
                        "0:region,150:region+rel+twin,400:all; default: the task's kinds throughout)")
    p.add_argument("--local-patches", action="store_true",
                   help="stage 1 without the image-level targets on every patch: a patch describes only its own "
                        "object and place (questions must find the objects)")
    p.add_argument("--isolated", action="store_true",
                   help="every stage-2 step: one sequence per image whose turns see the image and themselves only "
                        "(single-turn training, the image paid for once; overrides --no-packed)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-2d-positions", dest="init_2d_positions", action="store_false",
                   help="keep HF's random init of the vision position embeddings")
    p.add_argument("--init", default=None,
                   help="start from this checkpoint (written by this script) and run stage 2 only")
    p.add_argument("--first-scene", type=int, default=0,
                   help="stage 2 uses training scenes from this index on (give a continuation fresh scenes)")
    p.add_argument("--vision-cache", default=None, help="load stage 1 from this file if it exists, else save it there")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); 1 is fastest on a shared 2-core machine")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=0,
                   help="stage 2: save model and optimizer to OUT/resume.pt every N steps; a rerun of the same "
                        "command goes on from there (0: off)")
    p.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (0: off)")
    p.add_argument("--eval-n", type=int, default=200, help="validation records evaluated at the end (0: skip)")
    p.add_argument("--test-n", type=int, default=1000, help="held-out test records evaluated at the end")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, no evaluation (for CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.questions, args.eval_n, args.log_every, args.warmup = 2, 2, 0, 1, 1
        args.vision_steps, args.vision_batch, args.curriculum = 2, 2, [(2, 1), (1, 2)]
    return args


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
