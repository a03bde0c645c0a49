"""mkdocs hook: render the selector catalogue and the supported-models table (from the installed
registries) and the recipe list at build time."""
from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- selector-catalogue -->"
RECIPES = "<!-- recipe-list -->"
MODELS = "<!-- supported-models -->"
FAMILIES = "<!-- supported-families -->"
ORACLES = "keep-all = unpruned, cached = recomputed, sliced inputs, attention rows = eager, rows proxy = block, grids"
ROOT = Path(__file__).resolve().parents[2]


def _section(name: str) -> str:
    import fvlm
    from fvlm.commands.docstrings import split
    from fvlm.registry import REQUIRED

    info = fvlm.selector_info(name)
    needs = ", ".join(sorted(n.value for n in info.needs)) or "-"
    doc = split(info.doc.strip() or info.summary)  # the Args section becomes the table's last column
    rows = "\n".join(
        f"| `{p}` | `{ann or '-'}` | {'required' if default is REQUIRED else f'`{default!r}`'} | {doc.args.get(p, '')} |"
        for p, (ann, default) in info.parameters.items()
    )
    params = f"| parameter | type | default | meaning |\n|---|---|---|---|\n{rows}\n" if rows else "No parameters.\n"
    doc = doc.body
    return (
        f"## `{name}`\n\n`{info.cls.__module__}.{info.cls.__qualname__}` from `{info.distribution}`; "
        f"needs: {needs}; positions: {getattr(info.cls, 'positions', 'original')}\n\n{doc}\n\n{params}"
    )


ARXIV = re.compile(r"arXiv[ :]*(\d{4}\.\d{4,5})|arxiv\.org/abs/(\d{4}\.\d{4,5})")
LEAD = "pio_fvlm"


def _paper(info) -> str | None:
    """The arXiv id the selector's summary, class or module docstring cites first."""
    import sys

    for text in (info.summary, info.doc, sys.modules[info.cls.__module__].__doc__ or ""):
        match = ARXIV.search(text)
        if match:
            return match.group(1) or match.group(2)
    return None


def _faithfulness() -> dict[str, str]:
    """Method name -> result, from the first column / last column of the faithfulness page's tables."""
    results = {}
    for line in (ROOT / "docs/faithfulness.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 3 and cells[-1].startswith("identical"):
            results.setdefault(re.match(r"[\w-]+", cells[0]).group(0), cells[-1])
    return results


def _where(stage, tokens: int) -> str:
    where = {"vision": "vision tower output", "input": "LLM input"}.get(stage.where, f"after layer {stage.where}")
    keep = stage.keep if isinstance(stage.keep, int) else round(stage.keep * tokens)
    return f"{where}: {keep}"


def _summary_table(names: list[str]) -> str:
    """The catalogue's opening table: each method's paper, its default stages on LLaVA-1.5-7B (576
    visual tokens), what it needs and how its picks were checked against the authors' code."""
    import fvlm
    from fvlm.profiling.arch import load_architecture

    arch = load_architecture("llava-1.5-7b")
    info, tokens = arch.info(), arch.visual_tokens
    checked = _faithfulness()
    rows = []
    for name in names:
        about = fvlm.selector_info(name)
        paper = _paper(about)
        label = re.split(r" \(|:", about.summary, maxsplit=1)[0] if paper else about.summary.rstrip(".")
        try:
            stages = [s for s in about.cls().stages(info) if s.keep != 1.0] or about.cls().stages(info)
            where = "; ".join(_where(s, tokens) for s in stages)
        except TypeError:  # needs arguments (compose)
            where = "its parts'"
        needs = ", ".join(sorted(n.value for n in about.needs)) or "-"
        result = checked.get(re.match(r"[\w-]+", label if paper else name).group(0))
        status = f"[{result}](../faithfulness.md)" if result else "-"
        link = f"[{paper}](https://arxiv.org/abs/{paper})" if paper else "-"
        rows.append(f"| [`{name}`](#{name}) {label} | {link} | {where} | {needs} | {status} |")
    head = ("| method | paper | where it prunes: tokens kept by default (of 576 on LLaVA-1.5-7B) | needs | "
            "picks vs. the authors' code |\n|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def _order(names: list[str]) -> list[str]:
    """The lead method first, then the published methods, then baselines and helpers (each alphabetical)."""
    import fvlm

    return sorted(names, key=lambda n: (n != LEAD, _paper(fvlm.selector_info(n)) is None, n))


def _recipes() -> str:
    rows = []
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        comment = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        rows.append(f"| `{path.relative_to(ROOT)}` | {comment} |")
    return "| file | what it is |\n|---|---|\n" + "\n".join(rows) + "\n"


def _models() -> str:
    """One row per registered model type: what ``fvlm list --adapters`` shows, plus the selectors
    that apply (a selector needing vision-tower probes needs an adapter that provides them)."""
    import fvlm
    from fvlm.adapters.base import BackboneAdapter
    from fvlm.registry import get_adapter_class, list_adapters
    from fvlm.types import Need

    probing = [n for n in fvlm.list_selectors() if Need.VISION_ATTENTION in fvlm.selector_info(n).needs]
    rows = []
    for name in list_adapters():
        cls = get_adapter_class(name)
        about = cls.about or {}
        probes = cls.vision_probe is not BackboneAdapter.vision_probe
        selectors = "all" if probes or not probing else f"all but {', '.join(f'`{n}`' for n in probing)}"
        spec = cls.tiny.get(name)
        oracles = f"{ORACLES} (eager, SDPA)" if spec else "none (no tiny model)"
        backbone = f"`tiny:{name}`" if spec and spec.has_processor else "-"
        rows.append(f"| {about.get('name', cls.family)} | `{name}` | `{about.get('classes', {}).get(name, '-')}` | "
                    f"`{about.get('checkpoints', {}).get(name, '-')}` | {selectors} | {oracles} | {backbone} |")
    head = ("| family | model_type | transformers class | example checkpoint | selectors | tested oracles | "
            "tiny backbone for recipes |\n")
    return head + "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _families() -> str:
    """The registered model families by name, in registry order, each once (the home page's list)."""
    from fvlm.registry import get_adapter_class, list_adapters

    names = [(get_adapter_class(n).about or {}).get("name", get_adapter_class(n).family) for n in list_adapters()]
    return ", ".join(dict.fromkeys(names))


def on_page_markdown(markdown, page, config, files, **kwargs):
    if FAMILIES in markdown:
        markdown = markdown.replace(FAMILIES, _families())
    if MODELS in markdown:
        markdown = markdown.replace(MODELS, _models())
    if RECIPES in markdown:
        markdown = markdown.replace(RECIPES, _recipes())
    if MARKER not in markdown:
        return markdown
    import fvlm

    names = _order(fvlm.list_selectors())
    return markdown.replace(MARKER, _summary_table(names) + "\n" + "\n".join(_section(n) for n in names))
