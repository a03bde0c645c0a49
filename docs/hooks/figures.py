"""mkdocs hook: the pictures of the home page and Getting started, made by the ``fvlm`` commands on
every build (never committed, so they always show what the installed fvlm does).

Each entry of ``FIGURES`` is a site path and the ``fvlm`` command line that writes it; the pages
show the same command under the picture, so a reader can make it again.
"""
from __future__ import annotations

import contextlib
import io
import shlex
import tempfile
from pathlib import Path

FIGURES = {
    "img/keep.png": "fvlm visualize --sample 3 --keep 64 --out keep.png",
    "img/profile.png": ("fvlm profile --model llava-1.5-7b --selector pio_fvlm --selector fastv --selector sparsevlm "
                        "--budget 192 128 64 --plot profile.png"),
}
_made: dict[str, bytes] = {}  # one run per process: `mkdocs serve` rebuilds without re-running


def make(site_path: str, folder: Path) -> bytes:
    """Run the figure's command through the ``fvlm`` entry point, writing into ``folder``; the PNG bytes."""
    from fvlm.cli import main

    argv = shlex.split(FIGURES[site_path])[1:]
    out = folder / argv[-1]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main([*argv[:-1], str(out)])
    if code != 0 or not out.is_file():
        raise RuntimeError(f"`{FIGURES[site_path]}` exited with {code}:\n{printed.getvalue()}")
    return out.read_bytes()


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    with tempfile.TemporaryDirectory() as tmp:
        for site_path in FIGURES:
            if site_path not in _made:
                _made[site_path] = make(site_path, Path(tmp))
            files.append(File.generated(config, site_path, content=_made[site_path]))
    return files
