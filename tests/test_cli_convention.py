"""One command-line convention, and output a user can trust: every documented flag works in its dash
and its underscore spelling, booleans may be bare, ``fvlm run --help`` is short, output to a file
keeps every column, and a run prints no library chatter."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fvlm import cli, registry
from fvlm.commands import docstrings
from fvlm.commands import run as run_command
from fvlm.commands.options import respell

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md", ROOT / "recipes" / "README.md"]
TINY = ROOT / "recipes" / "tiny" / "llava-random.yaml"


def fvlm(*argv, columns: str = "80", timeout: int = 300) -> subprocess.CompletedProcess:
    """``fvlm ARGV...`` in a fresh process whose stdout is a pipe (not a terminal), ``COLUMNS`` as given."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS=columns)
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-c", "import sys; from fvlm.cli import main; sys.exit(main())", *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _documented_command_lines(blocks_only: bool = False) -> list[tuple[str, str]]:
    """``(page, "SUBCOMMAND rest of the line")`` for every ``fvlm SUBCOMMAND ...`` in the docs and READMEs:
    in code blocks (``\\`` continuations joined, comments cut) and, unless ``blocks_only``, code spans."""
    names = "|".join(_commands())
    found = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        if blocks_only:
            text = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S))
        for match in re.finditer(rf"\bfvlm\)?\s+({names})\b([^\n`#]*)", text):
            found.append((str(page.relative_to(ROOT)), f"{match.group(1)}{match.group(2)}".strip()))
    return found


def _documented_flags() -> list[tuple[str, str]]:
    flags = {(line.split()[0], flag) for _, line in _documented_command_lines()
             for flag in re.findall(r"(?<![\w-])(--[A-Za-z][\w.-]*)", line) if flag.islower()}  # --KEY: placeholder
    return sorted(flags)


def _both(flag: str) -> list[str]:
    return sorted({"--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")})


def test_the_docs_document_flags_of_every_kind():
    flags = _documented_flags()
    commands = {command for command, _ in flags}
    assert {"run", "profile", "visualize", "list"} <= commands, commands
    assert ("profile", "--list-models") in flags and ("run", "--print_config") in flags


@pytest.mark.parametrize("command,flag", _documented_flags())
def test_every_documented_flag_works_with_dashes_and_underscores(command, flag):
    if command == "run":
        parser = run_command.build_parser()
        for spelling in _both(flag):
            key = run_command.normalize_argv(parser, [spelling])[0]
            known = key in parser._option_string_actions or key in (run_command.PRINT_CONFIG, run_command.HELP_ALL)
            assert known, f"fvlm run {spelling}: not an option of the recipe parser ({key})"
        return
    sub = _commands()[command]
    for spelling in _both(flag):
        assert respell([spelling], sub._option_string_actions)[0] in sub._option_string_actions, \
            f"fvlm {command} {spelling} is not accepted"


def _concrete(line: str) -> bool:
    """A complete command line: no placeholders, and every file it names exists in the repo."""
    if re.search(r"[\[\]|$<>]|\.\.\.|[A-Z]{2,}", line):
        return False
    return all((ROOT / a).exists() for a in shlex.split(line) if a.endswith((".yaml", ".json", ".jsonl")))


CONCRETE = [(page, line) for page, line in _documented_command_lines(blocks_only=True) if _concrete(line)]


@pytest.mark.parametrize("page,line", CONCRETE)
def test_documented_command_lines_parse_in_both_spellings(page, line):
    """The real parsers take each documented command line with every option spelled with dashes, then
    with underscores (``fvlm run`` resolves and validates the recipe, loading no model)."""
    argv = shlex.split(line)
    for sep in "-_":
        spelled = [("--" + a[2:].replace("_" if sep == "-" else "-", sep)) if a.startswith("--") else a for a in argv]
        if argv[0] == "run":
            cfg = run_command.parse(spelled[1:])[1]
            assert cfg.get("model.backbone.path"), (page, spelled)
        else:
            assert cli.build_parser().parse_args(spelled).command == argv[0], (page, spelled)


def test_run_takes_dashes_underscores_and_bare_booleans(capsys):
    new = ["--overwrite", "--retry-errors", "false", "--model.fidelity", "--trainer.enable-progress-bar", "false",
           "--seed-everything", "3", "--print-config"]
    old = ["--overwrite", "true", "--retry_errors", "false", "--model.fidelity", "true",
           "--trainer.enable_progress_bar", "false", "--seed_everything", "3", "--print_config"]
    configs = []
    for argv in (new, old):
        assert cli.main(["run", "-c", str(TINY), *argv]) == 0
        configs.append(yaml.safe_load(capsys.readouterr().out))
    assert configs[0] == configs[1]
    cfg = configs[0]
    assert cfg["overwrite"] is True and cfg["retry_errors"] is False and cfg["seed_everything"] == 3
    assert cfg["model"]["fidelity"] is True and cfg["trainer"]["enable_progress_bar"] is False
    assert cli.main(["run", "-c", str(TINY), "--overwrite=false", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["overwrite"] is False


def test_other_commands_take_both_spellings(capsys):
    for flag in ("--list-models", "--list_models"):
        assert cli.main(["profile", flag]) == 0
        assert "llava-1.5-7b:" in capsys.readouterr().out
    assert cli.main(["profile", "--text_tokens", "0", "--decode-tokens", "4"]) == 0
    assert "576 visual + 0 text tokens" in capsys.readouterr().out


def test_run_help_shows_what_a_prediction_run_needs():
    short = fvlm("run", "--help", columns="100")
    assert short.returncode == 0, short.stderr
    lines = short.stdout.splitlines()
    assert len(lines) <= 90, len(lines)
    parser = run_command.build_parser()
    keys = [a.dest for a in parser._actions if a.dest.startswith(("model.", "data."))
            and not a.dest.endswith(".help") and type(a).__name__ != "_ActionConfigLoad"]
    for dest in keys:  # every model / data key, spelled out under its section
        group = dest.rpartition(".")[0]
        assert f"\n{group}:" in short.stdout and re.search(rf"^  --{re.escape(dest)} ", short.stdout, re.M), dest
    for option in ("--retry-errors", "--overwrite", "--print-config", "--help-all", "devices", "strategy"):
        assert option in short.stdout
    for training_only in ("max_epochs", "gradient_clip_val", "accumulate_grad_batches", "check_val_every_n_epoch"):
        assert training_only not in short.stdout
    full = fvlm("run", "--help-all", columns="100")
    assert full.returncode == 0 and "--trainer.max_epochs" in full.stdout
    assert len(full.stdout.splitlines()) > 3 * len(lines)


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("│┃").split("│" if "│" in line else "┃")]
            for line in text.splitlines() if line.startswith(("│", "┃"))]


def test_profile_to_a_file_keeps_every_column(tmp_path):
    out = tmp_path / "profile.txt"
    cmd = [sys.executable, "-c", "import sys; from fvlm.cli import main; sys.exit(main())",
           "profile", "--selector", "pio_fvlm", "--selector", "fastv", "--budget", "192", "64"]
    env = dict(os.environ, COLUMNS="80", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with out.open("w") as stdout:
        assert subprocess.run(cmd, cwd=ROOT, env=env, stdout=stdout, timeout=300).returncode == 0
    text = out.read_text()
    assert "…" not in text
    header, *rows = _table_rows(text)
    assert header == ["config", "stages", "LLM input visual", "layer avg", "paper TFLOPs", "x", "full TFLOPs", "x",
                      "KV MiB", "x"]
    assert [r[0] for r in rows] == ["keep_all", "pio_fvlm @192", "pio_fvlm @64", "fastv @192", "fastv @64"]
    assert all(len(r) == len(header) and all(r) for r in rows)
    assert rows[2][1:5] == ["1:92,10:54,15:22", "576", "64.00", "0.3257"]
    assert max(len(line) for line in text.splitlines()) > 80  # one line per row, not folded to the width


def test_list_to_a_pipe_has_a_complete_description_column():
    proc = fvlm("list")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    header, *rows = _table_rows(proc.stdout)
    assert header[:2] == ["name", "description"]
    described = {r[0]: r[1] for r in rows}
    for name in registry.list_selectors():
        assert described[name] == docstrings.plain(registry.selector_info(name).summary) != ""


def test_info_renders_docstrings_and_suggests_names():
    for name in registry.list_selectors():
        proc = fvlm("info", name)
        assert proc.returncode == 0, proc.stderr
        raw = re.findall(r"``|:(?:func|class|meth|mod|data|attr):|\]\[fvlm\.", proc.stdout)
        assert not raw, f"fvlm info {name} shows raw markup {raw}:\n{proc.stdout}"
    unknown = fvlm("info", "pio")
    assert unknown.returncode == 2 and "Did you mean 'pio_fvlm'?" in unknown.stderr


def test_markdown_of_references_roles_and_rest_spans():
    text = ("[`prune`][fvlm.prune] keeps [the trace][fvlm.trace.Trace]; :func:`~fvlm.session.prune`, "
            ":class:`fvlm.trace.Trace`, :class:`Trace <fvlm.trace.Trace>` and ``keep=8``.")
    assert docstrings.markdown(text) == ("`prune` keeps the trace; `prune`, `fvlm.trace.Trace`, `Trace` and `keep=8`.")
    assert docstrings.first_sentence("Keep tokens, e.g. 8 of them. Then more.") == "Keep tokens, e.g. 8 of them."
    doc = docstrings.split("Summary.\n\nBody text.\n\nArgs:\n    keep: visual tokens\n        kept.\n"
                           "    seed (int): the seed.\n\nReturns:\n    a selector.")
    assert doc.args == {"keep": "visual tokens kept.", "seed": "the seed."}
    assert "Args:" not in doc.body and "Returns:" in doc.body and "Body text." in doc.body


NOISE = ("GPU available", "TPU available", "Tip:", "litlogger", "LeafSpec", "Loading weights")


def test_a_run_prints_no_library_chatter(tmp_path):
    proc = fvlm("run", "-c", ROOT / "recipes/builtin/reference.yaml", "--data.limit", 2, "--output", tmp_path / "out",
                "--trainer.enable-progress-bar", "false", columns="200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    assert not [n for n in NOISE if n in proc.stdout + proc.stderr], proc.stderr
