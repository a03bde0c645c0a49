"""Documentation code cannot rot: every snippet the docs include is run here."""
from __future__ import annotations

import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
INCLUDE = re.compile(r'--8<--\s+"([^"]+)"')


def _included() -> list[str]:
    found = set()
    for page in DOCS.rglob("*.md"):
        found.update(INCLUDE.findall(page.read_text()))
    return sorted(found)


def test_every_include_exists():
    missing = []
    for include in _included():
        path, _, section = include.partition(":")  # "file.md:name" includes one marked section
        if not (ROOT / path).is_file() or (section and f"[start:{section}]" not in (ROOT / path).read_text()):
            missing.append(include)
    assert not missing, f"docs include missing files or sections: {missing}"


HUB_SNIPPET = "docs/snippets/hub_checkpoint.py"


@pytest.mark.parametrize("path", [p for p in _included() if p.startswith("docs/snippets/") and p.endswith(".py")
                                  and p != HUB_SNIPPET])
def test_included_snippet_runs(path):
    runpy.run_path(str(ROOT / path), run_name="__main__")


def test_every_snippet_is_included():
    unused = {f"docs/snippets/{p.name}" for p in (DOCS / "snippets").iterdir()} - set(_included())
    assert not unused, f"snippets not included by any page: {sorted(unused)}"


def test_hub_checkpoint_snippet_prints_what_it_says(tmp_path, capsys):
    """The Getting-started example, run as written on a stand-in for llava-hf/llava-1.5-7b-hf: the
    built-in checkpoint's processor (576 visual tokens, chat template) with a random model of
    Vicuna-7B's depth (32 layers), on the CPU in float32. The trace lines it prints depend only on
    those two numbers, so they must be the ones the snippet's closing comment promises."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    from fvlm.builtin import CHECKPOINT

    config = LlavaConfig.from_pretrained(CHECKPOINT)
    config.text_config.num_hidden_layers = 32
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    AutoProcessor.from_pretrained(CHECKPOINT).save_pretrained(tmp_path / "llava")
    Image.new("RGB", (500, 375), (40, 120, 200)).save(tmp_path / "photo.jpg")
    source = (ROOT / HUB_SNIPPET).read_text()
    stand_in = {'"llava-hf/llava-1.5-7b-hf"': repr(str(tmp_path / "llava")), '"cuda"': '"cpu"',
                "torch.float16": "torch.float32", '"photo.jpg"': repr(str(tmp_path / "photo.jpg"))}
    for old, new in stand_in.items():
        assert old in source, old
        source = source.replace(old, new)
    script = tmp_path / "hub_checkpoint.py"
    script.write_text(source)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.splitlines()
    promised = source.split("# prints the answer about your picture, then:\n", 1)[1].splitlines()
    assert printed[-len(promised):] == [line.removeprefix("# ") for line in promised]


# -- the built site ------------------------------------------------------------------------------
def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The documentation built as CI builds it (strict: any warning fails)."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


IMAGE = re.compile(r'<img[^>]*\bsrc="([^"]+)"')
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:python3? (benchmarks/[\w-]+\.py)|fvlm (\w+))\b([^`\n]*)")  # on lines joined at "\"


def _page_source(html_page: Path, site: Path) -> Path:
    """The Markdown source of a built page (``x/index.html`` -> ``docs/x.md`` or ``docs/x/index.md``)."""
    rel = html_page.parent.relative_to(site)
    candidates = [DOCS / "index.md"] if rel == Path(".") else [DOCS / f"{rel}.md", DOCS / rel / "index.md"]
    return next(p for p in candidates if p.is_file())


def test_every_picture_exists_and_its_page_names_the_command_that_made_it(site):
    """Every image a built page shows exists in the site, and is either drawn by the docs build
    (``docs/hooks/figures.py``: the page shows the hook's command) or a committed file whose page
    names a command of this repository that writes exactly that file."""
    figures = _hook("figures").FIGURES
    shown = 0
    for page in site.rglob("*.html"):
        for src in IMAGE.findall(page.read_text()):
            if src.startswith(("http:", "https:", "data:")) or "assets/" in src:
                continue  # the theme's own images
            target = (page.parent / src).resolve()
            assert target.is_file(), f"{page.relative_to(site)} shows a missing image {src}"
            site_path = target.relative_to(site.resolve()).as_posix()
            source = _page_source(page, site)
            text = source.read_text().replace("\\\n", " ")
            shown += 1
            if site_path in figures:
                assert not (DOCS / site_path).exists(), f"{site_path} is drawn by the build and must not be committed"
                assert figures[site_path] in text, f"{source.name} shows {site_path} without its command"
                continue
            committed = DOCS / site_path
            assert committed.is_file(), f"{site_path} is neither committed under docs/ nor drawn by the build"
            repo_path = committed.relative_to(ROOT).as_posix()
            makers = [m for m in COMMAND.finditer(text) if repo_path in m.group(3).split()]
            assert makers, f"{source.relative_to(ROOT)} shows {repo_path} but names no command that writes it"
            for maker in makers:
                script, command = maker.group(1), maker.group(2)
                if script:
                    assert (ROOT / script).is_file(), f"{source.name}: {script} does not exist"
                    option = maker.group(3).split()[maker.group(3).split().index(repo_path) - 1]
                    assert f'"{option}"' in (ROOT / script).read_text(), f"{script} has no option {option}"
                else:
                    assert command in ("visualize", "profile", "run", "compare"), command
    assert shown >= 4, f"only {shown} pictures in the site"


def test_markdown_images_all_render(site):
    """No image reference is lost in the Markdown (each `![..](..)` of a page becomes an <img>)."""
    for source in DOCS.rglob("*.md"):
        refs = MARKDOWN_IMAGE.findall(source.read_text())
        if not refs:
            continue
        rel = source.relative_to(DOCS).with_suffix("")
        built = site / ("index.html" if rel == Path("index") else rel / "index.html")
        if rel.name == "index" and rel != Path("index"):
            built = site / rel.parent / "index.html"
        assert len(IMAGE.findall(built.read_text())) >= len(refs), source


def test_getting_started_shows_what_the_builtin_run_prints(tmp_path, monkeypatch, capsys):
    """The expected output on the Getting-started page is what `fvlm run -c recipes/builtin/pio_fvlm-64.yaml`
    prints: every answer and figure, except the timings (prefill, decode, speedup), which vary."""
    from fvlm.commands import run as run_cmd

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FVLM_CACHE", str(tmp_path / "cache"))
    assert run_cmd.main(["-c", str(ROOT / "recipes/builtin/pio_fvlm-64.yaml"), "--trainer.enable-progress-bar", "false"]) == 0
    timing = re.compile(r"prefill|decode")

    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.splitlines() if not timing.search(line)]

    assert lines(capsys.readouterr().out) == lines((DOCS / "snippets/builtin_run.txt").read_text())


def test_getting_started_shows_the_trace_first_prune_prints(capsys):
    runpy.run_path(str(DOCS / "snippets/first_prune.py"), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    page = (DOCS / "getting-started.md").read_text()
    shown = re.search(r"```text\n(Trace\(.*\))\n```", page).group(1)
    ms = re.compile(r"\d+\.\d ms")
    assert ms.sub("ms", printed) == ms.sub("ms", shown)


def test_catalogue_opens_with_a_summary_table_lead_method_first(site):
    import fvlm

    page = (site / "reference/selectors/index.html").read_text()
    table = page[page.index("<table>"):page.index("</table>")]
    rows = re.findall(r'<tr>\s*<td><a href="#([\w-]+)"', table)
    assert rows[0] == "pio_fvlm" and sorted(rows) == sorted(fvlm.list_selectors())
    assert "https://arxiv.org/abs/2602.04657" in table and "after layer 1: 218" in table


def test_built_pages_show_no_sphinx_role_and_no_machine_path(site):
    """What mkdocstrings cannot render (a Sphinx role) or what describes one machine (an absolute
    path) fails the strict build through docs/hooks/checks.py; this checks the built HTML itself."""
    checks = _hook("checks")
    assert checks.problems("see :func:`<code>prune</code>` in <code>/home/me/fvlm</code>")  # the checks bite
    found = {str(p.relative_to(site)): checks.problems(p.read_text()) for p in site.rglob("*.html")}
    assert not {page: problems for page, problems in found.items() if problems}


def test_docstrings_use_mkdocstrings_references_not_sphinx_roles():
    """fvlm's docstrings are Markdown read by mkdocstrings: a Sphinx role would show as literal text
    (the strict build catches those it renders; this catches the rest, e.g. what `fvlm info` shows)."""
    role = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const|ref):`")
    allowed = {"fvlm/commands/docstrings.py"}  # documents the role syntax it converts for plugins
    found = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "fvlm").rglob("*.py")
             if p.relative_to(ROOT).as_posix() not in allowed
             for n, line in enumerate(p.read_text().splitlines(), 1) if role.search(line)]
    assert not found, found
