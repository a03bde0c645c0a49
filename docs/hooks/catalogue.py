"""mkdocs hook: render the selector catalogue (from the installed registry) and the recipe list at build time."""
from __future__ import annotations

from pathlib import Path

MARKER = "<!-- selector-catalogue -->"
RECIPES = "<!-- recipe-list -->"
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


def on_page_markdown(markdown, page, config, files, **kwargs):
    if RECIPES in markdown:
        markdown = markdown.replace(RECIPES, _recipes())
    if MARKER not in markdown:
        return markdown
    import fvlm

    return markdown.replace(MARKER, "\n".join(_section(n) for n in fvlm.list_selectors()))
