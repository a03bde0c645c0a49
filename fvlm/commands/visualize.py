"""``fvlm visualize``: which patches each selector keeps, drawn over the image, side by side.

Runs the built-in model (or a checkpoint of its layout, loaded by
[`BackboneSpec`][fvlm.backbones.BackboneSpec]) on one image and question once per selector,
records the indices every stage of the selector keeps (a session listener, ``StageRecorder``),
maps the last stage's kept set back to the original 24 x 24 patch grid (stage ``s`` indexes the
visual tokens left after stage ``s - 1``) and draws one panel per selector: kept patches in full
colour with an outline, dropped patches dimmed, the selector's answer under the title. Merging
selectors show the tokens that carry the merged values (``pool``: each block's top-left patch).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from fvlm.commands.exit_codes import ExitCode
from fvlm.errors import UsageError

DEFAULT_SELECTORS = ("pio_fvlm", "fastv", "visionzip", "vscan", "cdpruner", "divprune")
PANEL = 336  # px, the model's input size
TITLE_HEIGHT = 46


def add_parser(sub) -> None:
    p = sub.add_parser("visualize", help="draw the patches each selector keeps for one image and question (PNG)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="an image file (resized and center-cropped to 336 px)")
    source.add_argument("--sample", type=int, metavar="N", help="record N of the synthetic task (see --split)")
    p.add_argument("--split", default="test", help="split of --sample (train, val, test)")
    p.add_argument("--question", default=None, help="the question (default: the sample's own; required with --image)")
    p.add_argument("--selectors", nargs="+", default=list(DEFAULT_SELECTORS),
                   help="selectors (registered names or labels of fvlm/builtin/budgets.py)")
    p.add_argument("--keep", type=int, default=64, help="visual tokens kept (budget, of 576)")
    p.add_argument("--checkpoint", default=None, help="model folder (default: the shipped built-in model)")
    p.add_argument("--out", type=Path, default=Path("keep.png"), help="output PNG")
    p.set_defaults(func=run)


class StageRecorder:
    """A session listener that keeps every stage's kept indices (batch row 0)."""

    def __init__(self):
        self.stages: list[tuple[object, torch.Tensor]] = []

    def on_stage(self, stage, ctx, selection) -> None:
        self.stages.append((stage.where, selection.indices[0].detach().cpu().clone()))

    def kept(self, num_visual: int) -> list[int]:
        """Original patch indices that survive every recorded stage, in sequence order."""
        positions = torch.arange(num_visual)
        for _, indices in self.stages:
            positions = positions[indices[indices >= 0]]
        return positions.tolist()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _square(image: Image.Image) -> Image.Image:
    """What the processor feeds the model: shortest edge to 336 px, then a centred 336 px crop."""
    image = image.convert("RGB")
    w, h = image.size
    scale = PANEL / min(w, h)
    image = image.resize((max(PANEL, round(w * scale)), max(PANEL, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - PANEL) // 2, (h - PANEL) // 2
    return image.crop((left, top, left + PANEL, top + PANEL))


def draw_panel(image: Image.Image, kept: list[int] | None, title: str, subtitle: str, grid: int = 24) -> Image.Image:
    """One panel: ``image`` with the ``kept`` patches (row-major on a ``grid`` x ``grid`` layout) highlighted."""
    patch = PANEL // grid
    base = image.copy()
    if kept is not None:
        dim = Image.blend(base, Image.new("RGB", base.size, (20, 20, 20)), 0.72)
        mask = Image.new("L", base.size, 0)
        mdraw = ImageDraw.Draw(mask)
        for i in kept:
            r, c = divmod(int(i), grid)
            mdraw.rectangle((c * patch, r * patch, (c + 1) * patch - 1, (r + 1) * patch - 1), fill=255)
        base = Image.composite(base, dim, mask)
        draw = ImageDraw.Draw(base)
        for i in kept:
            r, c = divmod(int(i), grid)
            draw.rectangle((c * patch, r * patch, (c + 1) * patch - 1, (r + 1) * patch - 1), outline=(255, 140, 0))
    panel = Image.new("RGB", (PANEL, PANEL + TITLE_HEIGHT), "white")
    panel.paste(base, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(panel)
    draw.text((6, 4), title, fill="black", font=_font(16))
    draw.text((6, 25), subtitle, fill=(70, 70, 70), font=_font(13))
    return panel


def render(model, processor, image: Image.Image, question: str, labels: list[str], keep: int,
           reference: str | None = None, positions: str | None = None) -> tuple[Image.Image, list[dict]]:
    """The side-by-side PNG and, per panel, ``{label, answer, kept}`` (``kept`` None for the unpruned panel)."""
    import fvlm
    from fvlm.answering import Answerer, Prompt
    from fvlm.builtin import budgets as B

    image = _square(image)
    prompt = Prompt([image], question)
    num_visual = int(model.config.image_seq_length)
    grid = int(round(num_visual ** 0.5))
    num_layers = model.config.text_config.num_hidden_layers

    def generate(selector=None, listeners=()) -> str:
        answerer = Answerer(model, processor, selector, generation={"max_new_tokens": 3}, positions=positions,
                            listeners=listeners)
        with torch.no_grad():
            return answerer.answer([prompt])[0]["answer"]

    def mark(answer: str) -> str:
        if reference is None:
            return answer
        return f"{answer} ({'right' if answer == reference else 'wrong'})"

    unpruned = generate()
    panels = [draw_panel(image, None, "unpruned", f"{num_visual} tokens, answer: {mark(unpruned)}", grid)]
    info = [{"label": "unpruned", "answer": unpruned, "kept": None}]
    for label in labels:
        try:
            setting = B.setting(label)
            selector = fvlm.create_selector(setting.selector, **setting.make_kwargs(keep, num_layers))
            recorder = StageRecorder()
            answer = generate(selector, [recorder])
            kept = recorder.kept(num_visual)
        except Exception as exc:  # show the failure in its panel, keep going
            panels.append(draw_panel(image, [], f"{label}: failed", f"{type(exc).__name__}: {exc}"[:48], grid))
            info.append({"label": label, "answer": None, "kept": None, "error": f"{type(exc).__name__}: {exc}"})
            continue
        family = B.FAMILY.get(label)
        title = f"{label} ({family})" if family else label
        panels.append(draw_panel(image, kept, title, f"{len(kept)} kept, answer: {mark(answer)}", grid))
        info.append({"label": label, "answer": answer, "kept": kept})

    header = 30
    sheet = Image.new("RGB", (PANEL * len(panels) + 8 * (len(panels) - 1), PANEL + TITLE_HEIGHT + header), "white")
    ImageDraw.Draw(sheet).text((6, 6), f"Q: {question}" + (f"   (reference: {reference})" if reference else ""),
                               fill="black", font=_font(16))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (PANEL + 8), header))
    return sheet, info


def run(args: argparse.Namespace) -> int:
    from fvlm.builtin import synthetic

    reference = None
    if args.sample is not None:
        if args.split not in synthetic.SPLITS:
            raise UsageError(f"--split must be one of {', '.join(synthetic.SPLITS)}")
        record = synthetic.sample(args.split, args.sample)
        image, question = record["image"], args.question or record["question"]
        reference = record["answer"] if args.question is None else None
    else:
        if not args.question:
            raise UsageError("--image needs --question")
        try:
            image = Image.open(args.image)
        except OSError as exc:
            raise UsageError(f"cannot read image {args.image}: {exc}") from exc
        question = args.question
    if not 1 <= args.keep <= 576:
        raise UsageError("--keep must be between 1 and 576")
    check_labels(args.selectors)
    from fvlm.backbones import BackboneSpec
    from fvlm.console import console as _console, quiet_libraries

    with quiet_libraries():  # no "Loading weights" bar
        model, processor = BackboneSpec(args.checkpoint or "builtin").load()
        sheet, info = render(model, processor, image, question, args.selectors, args.keep, reference)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    console = _console()
    for item in info:
        status = item.get("error") or f"answer {item['answer']!r}" + (
            "" if item["kept"] is None else f", {len(item['kept'])} patches kept")
        console.print(f"{item['label']}: {status}", markup=False)
    console.print(f"wrote {args.out}", markup=False)
    failed = [item["label"] for item in info if item.get("error")]
    if failed:
        _console(stderr=True).print(
            f"fvlm visualize: {len(failed)} of {len(info) - 1} selectors failed ({', '.join(failed)}): "
            "their panels show the error", style="red", soft_wrap=True)
        return ExitCode.INCOMPLETE
    return ExitCode.OK


def check_labels(labels: list[str]) -> None:
    """Every label names a registered selector with a budget mapping (before the model is loaded)."""
    from fvlm.builtin import budgets as B

    for label in labels:
        try:
            B.setting(label)
        except ValueError as exc:  # no budget mapping; unknown names raise UnknownSelectorError
            raise UsageError(f"--selectors {label}: {exc}") from None
