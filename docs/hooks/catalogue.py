"""mkdocs hook: render the selector catalogue from the installed registry at build time."""
from __future__ import annotations

MARKER = "<!-- selector-catalogue -->"


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
        f"needs: {needs}\n\n{doc}\n\n{params}"
    )


def on_page_markdown(markdown, page, config, files, **kwargs):
    if MARKER not in markdown:
        return markdown
    import fvlm

    return markdown.replace(MARKER, "\n".join(_section(n) for n in fvlm.list_selectors()))
