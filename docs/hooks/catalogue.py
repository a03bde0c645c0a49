"""mkdocs hook: render the selector catalogue and the supported-models table (from the installed
registries) and the recipe list at build time."""
from __future__ import annotations

from pathlib import Path

MARKER = "<!-- selector-catalogue -->"
RECIPES = "<!-- recipe-list -->"
MODELS = "<!-- supported-models -->"
ORACLES = "keep-all = unpruned, cached = recomputed, sliced inputs, attention rows = eager, rows proxy = block, grids"
ROOT = Path(__file__).resolve().parents[2]


def _section(name: str) -> str:
    import fvlm
    from fvlm.registry import REQUIRED

    info = fvlm.selector_info(name)
    needs = ", ".join(sorted(n.value for n in info.needs)) or "-"
    rows = "\n".join(
        f"| `{p}` | `{ann or '-'}` | {'required' if default is REQUIRED else f'`{default!r}`'} |"
        for p, (ann, default) in info.parameters.items()
    )
    doc = info.doc.strip() or info.summary
    params = f"| parameter | type | default |\n|---|---|---|\n{rows}\n" if rows else "No parameters.\n"
    return (
        f"## `{name}`\n\n`{info.cls.__module__}.{info.cls.__qualname__}` from `{info.distribution}`; "
        f"needs: {needs}; positions: {getattr(info.cls, 'positions', 'original')}\n\n{doc}\n\n{params}"
    )


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


def on_page_markdown(markdown, page, config, files, **kwargs):
    if MODELS in markdown:
        markdown = markdown.replace(MODELS, _models())
    if RECIPES in markdown:
        markdown = markdown.replace(RECIPES, _recipes())
    if MARKER not in markdown:
        return markdown
    import fvlm

    return markdown.replace(MARKER, "\n".join(_section(n) for n in fvlm.list_selectors()))
