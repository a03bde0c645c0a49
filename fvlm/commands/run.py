"""``fvlm run``: a recipe-driven data-set run (predict or test) with Lightning.

A recipe is LightningCLI-style YAML with four sections plus a few run options::

    model:    FVLMModule arguments (backbone, selector, generation, ...)
    data:     VQADataModule arguments (path, batch_size, metric, ...)
    trainer:  lightning.Trainer arguments (accelerator, devices, strategy, num_nodes, callbacks, ...)
    mode: predict | test          output: outputs/<recipe>/<data>          seed_everything: 0

Several ``-c`` files compose (later ones override earlier ones), a section may be a path to a
fragment file (relative to the including file), and ``--section.key=value`` overrides any value.
``--print-config`` prints the resolved, validated recipe and exits. ``--help`` lists what a
prediction run needs (``fvlm.commands.run_help``), ``--help-all`` every accepted key. Options take
dashes or underscores and booleans may be bare (``fvlm.commands.options``).

Every run writes ``<output>/predictions.jsonl`` (one line per sample, resumable: re-running the
same command only does the samples without an answer), ``<output>/summary.json`` (scores, fidelity,
efficiency) and ``<output>/config.yaml``, and prints a summary table. The exit code is 0 only when
every requested sample has an answer (see [`ExitCode`][fvlm.commands.exit_codes.ExitCode]). Data-set runs scale with
Lightning's strategies, e.g. ``--trainer.devices=8 --trainer.strategy=ddp`` (see
docs/how-to/distributed-runs.md).
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from fvlm.commands.exit_codes import ExitCode, for_error
from fvlm.console import console, quiet_libraries
from fvlm.errors import FVLMError, SelectorArgumentError, UsageError

HELP = "run a recipe: predictions, scores and efficiency figures for a data set (fvlm run --help)"
_ARGV_PREFIX = "\x00"  # no real argument starts with NUL: argparse forwards everything to jsonargparse
PRINT_CONFIG, HELP_ALL = "--print_config", "--help_all"  # handled by fvlm run, not by the recipe parser
# Sections whose change makes earlier predictions in the same output folder incomparable.
_FINGERPRINT_SKIP = {"data.batch_size", "data.num_workers", "data.limit", "model.on_error"}


class RecipeError(UsageError):
    """A recipe that parses but cannot run as given (the message names the key)."""


# -- command-line wiring -----------------------------------------------------------------------
def add_parser(sub) -> None:
    """Register ``fvlm run`` on the ``fvlm`` subparsers (arguments go to [`main`][fvlm.commands.run.main])."""
    p = sub.add_parser("run", help=HELP, add_help=False, prefix_chars=_ARGV_PREFIX)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: main(args.argv))


@functools.lru_cache(maxsize=1)
def build_parser():
    """The jsonargparse parser of a recipe (LightningCLI layout: model / data / trainer); built once."""
    from jsonargparse import ActionConfigFile
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser
    from typing import Literal

    from fvlm.lightning.data import VQADataModule
    from fvlm.lightning.module import FVLMModule

    parser = LightningArgumentParser(
        prog="fvlm run", description="Run a recipe over a data set (predict or test) with Lightning.",
        exit_on_error=False, print_config=None, parser_mode="yaml", allow_abbrev=False,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="recipe YAML file(s); later ones override")
    parser.add_argument("--mode", type=Literal["predict", "test"], default="predict",
                        help="predict: write predictions; test: also log accuracy through the Trainer's loggers")
    parser.add_argument("--output", type=Optional[str], default=None,
                        help="output folder (default: outputs/<last recipe file name>/<data file name>)")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="delete earlier predictions in the output folder instead of resuming")
    parser.add_argument("--retry_errors", type=bool, default=True,
                        help="re-run samples whose earlier line holds an error (false: keep those lines)")
    parser.add_argument("--reference", type=Optional[str], default=None,
                        help="predictions.jsonl of an unpruned run: adds answer agreement by id to the summary")
    parser.add_argument("--show", type=int, default=5, help="print the answers of the first N samples")
    parser.add_argument("--seed_everything", type=Union[bool, int], default=0,
                        help="seed for lightning.seed_everything (false: do not seed)")
    parser.add_class_arguments(FVLMModule, "model", fail_untyped=False, sub_configs=True)
    parser.add_class_arguments(VQADataModule, "data", fail_untyped=False, sub_configs=True)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
                               skip={"inference_mode"})
    parser.add_argument("--trainer.inference_mode", type=Optional[bool], default=None,
                        help="default: true, or false when the selector needs gradients")
    parser.set_defaults({
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.enable_model_summary": False,
    })
    return parser


# -- validation --------------------------------------------------------------------------------
def _selector_section(cfg) -> Any:
    model = cfg.get("model")
    return None if model is None else model.get("selector")


def check_selector(cfg) -> Any:
    """Validate ``model.selector`` and build it (the one time a run builds it); the instance or None.

    ``args`` are type-checked against the class's signature and completed with its defaults, so
    the printed config shows every parameter; the selector's own checks then name a bad value.
    """
    from jsonargparse import ArgumentParser, Namespace

    from fvlm.selectors.spec import resolve_selector_class

    section = _selector_section(cfg)
    if section is None:
        return None
    name, args = section.get("name"), section.get("args") or {}
    if not isinstance(args, dict):
        raise RecipeError(f"model.selector.args must be a mapping, got {args!r}")
    try:
        cls = resolve_selector_class(name)
    except Exception as exc:
        raise RecipeError(f"model.selector.name: {exc}") from None
    key = "model.selector.args"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, key, fail_untyped=False)
    try:
        parsed = parser.parse_object({"model": {"selector": {"args": args}}})
    except Exception as exc:
        from fvlm.selectors.spec import SelectorSpec

        try:  # the selector's own check names the parameter and its range better than the type check
            SelectorSpec(name=name, args=args).build()
        except SelectorArgumentError as own:
            raise _argument_error(name, own) from None
        except Exception:
            pass
        raise RecipeError(f"selector {name!r}: {exc}") from None
    full = parsed.get(key)
    full = full.as_dict() if isinstance(full, Namespace) else dict(full or {})
    selector = _build(name, args)
    section.args = {k: _plain(v) for k, v in full.items() if k in args or _is_plain(v)}
    return selector


def _argument_error(name: str, exc: SelectorArgumentError) -> RecipeError:
    where = "model.selector.args" + (f".{exc.parameter}" if exc.parameter else "")
    return RecipeError(f"{where} ({name}): {exc}")


def _build(name: str, args: dict):
    from fvlm.selectors.spec import SelectorSpec

    try:
        return SelectorSpec(name=name, args=args).build()
    except SelectorArgumentError as exc:
        raise _argument_error(name, exc) from None
    except Exception as exc:
        raise RecipeError(f"model.selector ({name!r}): {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """An exception as one line: fvlm's own messages as they are, others with their type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, (SelectorArgumentError, UsageError)) else f"{type(exc).__name__}: {text}"


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


def _plain(value):
    """YAML-friendly copy: tuples become lists (jsonargparse warns when dumping tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_inference_mode(cfg, selector) -> bool:
    """The Trainer's ``inference_mode``: false for gradient selectors; an explicit true for one is an error."""
    needs = getattr(selector, "needs", frozenset()) if selector is not None else frozenset()
    from fvlm.selectors.base import Need

    wanted = cfg.get("trainer.inference_mode")
    if Need.GRADIENT in needs:
        if wanted is True:
            raise RecipeError(
                f"trainer.inference_mode: the selector {type(selector).__name__} needs gradients, which "
                "torch.inference_mode() forbids; set trainer.inference_mode: false or leave it out "
                "(fvlm run then turns it off for gradient selectors)")
        return False
    return True if wanted is None else bool(wanted)


def check_data(data) -> None:
    """The data file exists and parses, its ids are unique, and it holds records: read before any model."""
    try:
        data.setup()
    except (OSError, ValueError) as exc:
        raise RecipeError(f"data.path: {' '.join(str(exc).split())}") from None
    if not data.records:
        raise RecipeError(f"data.path: {data.path} holds no records: nothing to run")


def check_backbone(backbone) -> None:
    """The checkpoint exists and fvlm has an adapter for it: its config is read, no weights."""
    try:
        backbone.check()
    except FVLMError as exc:
        raise RecipeError(f"model.backbone.path: {exc}") from None


# -- output folder -----------------------------------------------------------------------------
def _launch_rank() -> int:
    """This process's global rank as the launcher set it (0 before Lightning starts any worker)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)) or 0) > 0:
        return 1
    for key in ("LOCAL_RANK", "SLURM_PROCID"):
        if key in env:
            return int(env[key])
    return 0


def _flatten(value, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _fingerprint(config: dict) -> dict[str, Any]:
    flat = _flatten({k: config.get(k) for k in ("model", "data")})
    return {k: v for k, v in flat.items() if k not in _FINGERPRINT_SKIP}


def prepare_output(output: Path, config: dict, dumped: str, overwrite: bool) -> None:
    """Check that ``output`` holds no run of another configuration; write config.yaml (rank 0)."""
    import yaml

    from fvlm.lightning.callbacks import PREDICTIONS, SHARDS, prediction_files

    previous = output / "config.yaml"
    if overwrite:
        for path in (output / PREDICTIONS, output / "summary.json", previous):
            path.unlink(missing_ok=True)
        shutil.rmtree(output / SHARDS, ignore_errors=True)
    elif prediction_files(output) and not previous.is_file():
        raise RecipeError(f"{output} holds predictions but no config.yaml: fvlm cannot tell which configuration "
                          "wrote them. Use another --output, or --overwrite true to discard them.")
    elif prediction_files(output):
        old, new = _fingerprint(yaml.safe_load(previous.read_text()) or {}), _fingerprint(config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
            raise RecipeError(f"{output} holds predictions of a different configuration: {shown}. "
                              "Use another --output, or --overwrite true to discard them.")
    output.mkdir(parents=True, exist_ok=True)
    previous.write_text(dumped)


# -- run ---------------------------------------------------------------------------------------
def note_budget_spelling(cfg) -> None:
    """Point out ``keep: 1`` in the selector's arguments: one visual token, where 1.0 means all of them."""
    section = _selector_section(cfg)
    args = None if section is None else section.get("args", section.get("init_args"))
    keep = (args.as_dict() if hasattr(args, "as_dict") else dict(args or {})).get("keep")
    if keep == 1 and isinstance(keep, int) and not isinstance(keep, bool):
        _note("model.selector keep: 1 keeps ONE visual token per sample (an int is a count); "
              "write keep: 1.0 to keep every token")


def normalize_argv(parser, argv: Sequence[str]) -> list[str]:
    """``argv`` in the recipe parser's spelling: underscores in keys, ``true`` after a bare boolean."""
    from typing import Optional

    from fvlm.commands.options import bare_booleans, respell

    actions = parser._option_string_actions
    booleans = {option for option, action in actions.items()
                if getattr(action, "_typehint", None) in (bool, Optional[bool])}
    return bare_booleans(respell(argv, {*actions, PRINT_CONFIG, HELP_ALL}, default="_"), booleans)


def parse(argv: Sequence[str]):
    """``(parser, cfg, selector, print_config)`` for ``fvlm run`` arguments (validated)."""
    parser = build_parser()
    argv = normalize_argv(parser, argv)
    print_config = PRINT_CONFIG in argv
    argv = [a for a in argv if a != PRINT_CONFIG]
    try:
        cfg = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        if "model.selector" in str(exc) and "class_path" in str(exc):
            raise RecipeError("model.selector: write {name: <registered name or module.Class>, args: {...}}; "
                              "the class_path / init_args form is not a selector syntax") from None
        if "required" in str(exc) and "data.path" in str(exc):
            raise RecipeError("data.path: the recipe names no data set; pass --data.path FILE.jsonl (fvlm's quick "
                              "scorers), or score its model with lmms-eval: lmms-eval --model fvlm "
                              "--model_args recipe=RECIPE.yaml --tasks ...") from None
        raise
    selector = check_selector(cfg)
    note_budget_spelling(cfg)
    backbone = cfg.get("model.backbone")
    if backbone is not None and (backbone.get("trust_remote_code") or any(
            (backbone.get(k) or {}).get("trust_remote_code") for k in ("model_kwargs", "processor_kwargs"))):
        _note("model.backbone.trust_remote_code is true: the checkpoint's own Python code will run; "
              "use it only with checkpoints (and recipes) you trust")
    check_inference_mode(cfg, selector)
    return parser, cfg, selector, print_config


def instantiate(parser, cfg, selector):
    """The recipe's objects; the module gets the selector ``check_selector`` built (built once)."""
    section = _selector_section(cfg)
    try:
        if section is not None:
            cfg.model.selector = None
        init = parser.instantiate(cfg)
    except (ValueError, TypeError) as exc:  # a value the classes refuse, e.g. data.batch_size: 0
        raise RecipeError(" ".join(str(exc).split())) from None
    finally:
        if section is not None:
            cfg.model.selector = section
    if section is not None:
        init.model.use_selector(selector, section.name)
    return init


def _default_output(cfg) -> str:
    """``outputs/<last recipe file>/<data file>``: one folder per experiment and data set."""
    configs = [str(p) for p in (cfg.get("config") or []) if p is not None]
    stem = Path(configs[-1]).stem if configs else "fvlm"
    data = cfg.get("data.path")
    name = Path(os.fspath(data)).stem.replace(":", "-") if data else "data"  # builtin:test -> builtin-test
    return str(Path("outputs") / stem / name)


def _callbacks(trainer_cfg: dict, output: Path, retry_errors: bool) -> list:
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

    from fvlm.lightning.callbacks import EfficiencyMonitor, PredictionWriter, StopOnSigterm

    given = trainer_cfg.get("callbacks") or []
    given = list(given) if isinstance(given, (list, tuple)) else [given]
    monitors = [c for c in given if isinstance(c, EfficiencyMonitor)] or [EfficiencyMonitor()]
    writers = [c for c in given if isinstance(c, PredictionWriter)]
    if not writers:
        writers = [PredictionWriter(str(output), retry_errors=retry_errors)]
    stops = [c for c in given if isinstance(c, StopOnSigterm)] or [StopOnSigterm()]
    others = [c for c in given if not isinstance(c, (EfficiencyMonitor, PredictionWriter, StopOnSigterm))]
    if trainer_cfg.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in others):
        others.append(RichProgressBar())
    # a stop comes after the writing: the batch's lines are on disk before the run ends
    return others + monitors + writers + stops


def print_help(argv: Sequence[str]) -> bool:
    """Print the short help for ``-h`` / ``--help``, the parser's own for ``--help-all``; whether it did."""
    wanted = {"-h", "--help", "--help-all", HELP_ALL} & set(argv)
    if not wanted:
        return False
    parser = build_parser()
    if wanted & {"--help-all", HELP_ALL}:
        parser.print_help()
    else:
        from fvlm.commands.run_help import format_help

        sys.stdout.write(format_help(parser))
    return True


def run(argv: Sequence[str]) -> int:
    if print_help(argv):
        return ExitCode.OK
    parser, cfg, selector, print_config = parse(argv)
    if print_config:
        sys.stdout.write(parser.dump(cfg, skip_unset=False))
        return 0
    from lightning.pytorch import Trainer, seed_everything

    init = instantiate(parser, cfg, selector)
    module, data = init.model, init.data
    check_data(data)
    if cfg.reference and not Path(cfg.reference).is_file():
        raise RecipeError(f"reference: no such predictions file: {cfg.reference}")
    check_backbone(module.backbone)
    output = Path(cfg.output or _default_output(cfg))
    cfg.output = str(output)
    inference_mode = check_inference_mode(cfg, selector)
    dumped = parser.dump(cfg, skip_unset=False)
    if _launch_rank() == 0:
        import yaml

        prepare_output(output, yaml.safe_load(dumped), dumped, cfg.overwrite)
        if not cfg.retry_errors:
            from fvlm.lightning.callbacks import finished_ids

            kept = finished_ids(output, retry_errors=False) - finished_ids(output, retry_errors=True)
            if kept:
                _note(f"keeping the error lines of {len(kept)} samples from an earlier run as final "
                      "(--retry_errors false): they are not retried")
    if cfg.seed_everything is not False:
        seed_everything(int(cfg.seed_everything), workers=True, verbose=False)

    trainer_cfg = dict(vars(init.trainer))
    trainer_cfg["callbacks"] = _callbacks(trainer_cfg, output, cfg.retry_errors)
    trainer_cfg["inference_mode"] = inference_mode
    with quiet_libraries():  # Lightning's device banner and tips, transformers' loading bar
        trainer = Trainer(**trainer_cfg)
        stopped = _run_trainer(trainer, module, data, cfg.mode, output)
    if stopped is not None:
        return stopped
    if not trainer.is_global_zero:
        return 0
    return _summarize(trainer, module, data, cfg, output)


def _run_trainer(trainer, module, data, mode: str, output: Path) -> ExitCode | None:
    """``trainer.predict`` / ``trainer.test``; the exit code when a signal stopped it, else None."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from fvlm.lightning.callbacks import StopOnSigterm

    stop = next(c for c in trainer.callbacks if isinstance(c, StopOnSigterm))
    try:
        if mode == "test":
            trainer.test(module, datamodule=data, verbose=False)
        else:
            trainer.predict(module, datamodule=data, return_predictions=False)
    except SystemExit as exc:  # SIGTERM (raised at a batch boundary), or Lightning's exit after Ctrl-C
        terminated = isinstance(exc, SIGTERMException)
        if not (terminated or stop.interrupted):
            raise
        signal = "SIGTERM" if terminated else "Ctrl-C (SIGINT)"
        _note(f"stopped by {signal}; the answers written so far are kept in {output}: run the same command "
              "again to resume", error=True)
        return ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED
    return None


def _summarize(trainer, module, data, cfg, output: Path) -> ExitCode:
    """Merge the predictions, write and print the summary of the requested samples; the exit code."""
    import json

    from fvlm.lightning.callbacks import PredictionWriter, merge_predictions
    from fvlm.metrics.scoring import read_jsonl, summarize

    writer = next(c for c in trainer.callbacks if isinstance(c, PredictionWriter))
    predictions = merge_predictions(writer.output_dir, data.ids)  # no-op after a normal end; completes a resumed one
    requested = set(data.ids)
    lines = read_jsonl(predictions)
    records = [r for r in lines if str(r["id"]) in requested]  # the summary covers the requested samples only
    reference = read_jsonl(cfg.reference) if cfg.reference else None
    summary = summarize(records, reference)
    missing = sorted(requested - {str(r["id"]) for r in records})
    summary.update(**module.describe(), layer_average=(summary["efficiency"] or {}).get("layer_average"),
                   backbone=module.backbone.path, mode=cfg.mode, missing=len(missing), output=str(output))
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, output, records[: cfg.show])
    if len(lines) > len(records):
        _note(f"{predictions} also holds {len(lines) - len(records)} lines of samples this run did not request "
              "(e.g. from an earlier run with a larger data.limit); the summary leaves them out")
    unanswered = summary["errors"] + len(missing)
    if unanswered:
        _note(f"{unanswered} of {len(requested)} requested samples have no answer ({summary['errors']} errors, "
              f"{len(missing)} missing); see {output / 'summary.json'}. Run the same command again to retry "
              "them.", error=True)
        return ExitCode.INCOMPLETE
    return ExitCode.OK


def _note(message: str, error: bool = False) -> None:
    """One line on stderr (red for a reason the exit code is not 0)."""
    from rich.text import Text

    console(stderr=True).print(Text(f"fvlm run: {message}", style="red" if error else "yellow"), soft_wrap=True)


def print_summary(summary: dict, output: Path, examples: Sequence[dict] = ()) -> None:
    """The summary table, preceded by ``examples`` (prediction records) as a table of answers."""
    from rich.table import Table

    out = console()
    if examples:
        answers = Table(title="answers (first samples)", title_justify="left")
        for column in ("id", "question", "reference", "answer"):
            answers.add_column(column)
        unpruned = any(r.get("reference_answer") is not None for r in examples)
        if unpruned:
            answers.add_column("unpruned")
        for r in examples:
            reference = " | ".join(str(a) for a in (r.get("answers") or [])[:3])
            row = [str(r["id"]), r.get("question", ""), reference, r.get("error") or r.get("answer", "")]
            answers.add_row(*row, *([str(r.get("reference_answer", "-"))] if unpruned else []))
        out.print(answers)

    def fmt(value, spec: str = ".3f") -> str:
        if value is None:
            return "-"
        return format(value, spec) if isinstance(value, float) else str(value)

    table = Table(title=f"fvlm run: {summary['backbone']} + {summary['selector']} ({summary['mode']})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples", f"{summary['samples']} ({summary['errors']} errors, {summary['missing']} missing)")
    table.add_row("accuracy (all scored)", fmt(summary["accuracy"]))
    for metric, values in summary["scores"].items():
        extra = ""
        if metric == "yes_no":
            extra = f"  F1 {values['f1']:.3f}, yes {values['yes_ratio']:.2f}"
        table.add_row(f"  {metric}", f"{values['accuracy']:.3f} (n={values['count']}){extra}")
    for category, values in (summary.get("categories") or {}).items():
        table.add_row(f"  category {category}", f"{values['accuracy']:.3f} (n={values['count']})")
    fid = summary.get("fidelity") or {}
    if fid.get("answer_agreement") is not None:
        table.add_row("agreement with unpruned", fmt(fid["answer_agreement"]))
        table.add_row("first-token KL / top-1", f"{fmt(fid.get('first_token_kl'), '.4f')} / {fmt(fid.get('first_token_top1'))}")
    if fid.get("reference_run_agreement") is not None:
        table.add_row("agreement with --reference", fmt(fid["reference_run_agreement"]))
    eff = summary.get("efficiency") or {}
    if eff:
        table.add_row("visual tokens: input -> LLM", f"{fmt(eff.get('visual_tokens'), '.1f')} -> {fmt(eff.get('llm_input_visual'), '.1f')}")
        table.add_row("visual tokens: layer average", fmt(eff.get("layer_average"), ".1f"))
        kv = eff.get("kv_bytes")
        table.add_row("KV cache per sample", "-" if kv is None else f"{kv / 2**20:.2f} MiB")
        table.add_row("prefill per sample", f"{fmt(eff.get('prefill_ms'), '.1f')} ms")
        table.add_row("decode per token", f"{fmt(eff.get('decode_ms_per_token'), '.2f')} ms")
        if eff.get("prefill_speedup") is not None:
            table.add_row("speedup vs unpruned: prefill", f"{eff['prefill_speedup']:.2f}x "
                          f"({fmt(eff.get('unpruned_prefill_ms'), '.1f')} ms unpruned)")
            table.add_row("speedup vs unpruned: decode", "-" if eff.get("decode_speedup") is None else
                          f"{eff['decode_speedup']:.2f}x ({eff['unpruned_decode_ms_per_token']:.2f} ms unpruned)")
    out.print(table)
    out.print(f"predictions: {output / 'predictions.jsonl'}\nsummary: {output / 'summary.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    """``fvlm run`` entry point; returns the exit status (2 for a recipe error)."""
    from rich.text import Text

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(run(argv))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (argparse.ArgumentError, RecipeError) as exc:
        console(stderr=True).print(Text(f"fvlm run: recipe error: {exc}", style="red"), soft_wrap=True)
        return ExitCode.USAGE
    except FVLMError as exc:
        console(stderr=True).print(Text(f"fvlm run: error: {exc}", style="red"), soft_wrap=True)
        return for_error(exc)
