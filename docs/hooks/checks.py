"""mkdocs hook: a page that shows a Sphinx role (``:func:`x```, which mkdocstrings prints as text) or
an absolute path of some machine is a warning, so the strict build fails."""
from __future__ import annotations

import logging
import re

log = logging.getLogger("mkdocs.plugins.fvlm.checks")

# :func:`x`, :class:`x`, :py:meth:`x`, ... as rendered: the role's text, then a code element
ROLE = re.compile(r"(?<![\w:]):(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const|ref):(?=`|<code>)")
# an absolute path under a home, project or system folder, or a Windows drive: a path on the machine
# that wrote the page (the temporary folder is anyone's)
MACHINE_PATH = re.compile(r"(?<![\w.~/:-])(?:/(?:home|work|root|Users|mnt|opt|srv|scratch|private|var|usr)/"
                          r"|\b[A-Z]:\\\\)")


def problems(html: str) -> list[str]:
    """What a reader should not see in ``html``: each role and machine path, with its context."""
    found = []
    for name, pattern in (("Sphinx role", ROLE), ("absolute machine path", MACHINE_PATH)):
        for match in pattern.finditer(html):
            found.append(f"{name}: ...{html[max(match.start() - 40, 0):match.end() + 40]!r}...")
    return found


def on_post_page(output, page, config, **kwargs):
    for problem in problems(output):
        log.warning(f"{page.file.src_uri}: {problem}")
    return output
