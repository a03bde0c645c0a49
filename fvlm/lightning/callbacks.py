"""Run callbacks: per-sample prediction lines (resumable, DDP-safe) and efficiency figures.

Both work with the records [`FVLMModule`][fvlm.lightning.module.FVLMModule] returns from
``predict_step`` / ``test_step`` (which already carry their timings).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch import Callback

from fvlm.metrics.scoring import read_jsonl, summarize_efficiency

PREDICTIONS = "predictions.jsonl"
SHARDS = "shards"


# -- prediction files --------------------------------------------------------------------------
def _repair(path: Path) -> None:
    """Cut an interrupted last line (no trailing newline) off a JSONL file."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        fh.truncate(cut)


def prediction_files(output_dir: str | os.PathLike) -> list[Path]:
    """The merged file and every rank's shard (from this or an interrupted earlier run)."""
    out = Path(output_dir)
    files = [out / PREDICTIONS] if (out / PREDICTIONS).is_file() else []
    return files + sorted((out / SHARDS).glob("*.jsonl"))


def _lines(files: Iterable[Path]) -> Iterable[dict]:
    for path in files:
        yield from read_jsonl(path)


def finished_ids(output_dir: str | os.PathLike, retry_errors: bool = True) -> set[str]:
    """Ids that already have a line (error lines count only without ``retry_errors``)."""
    return {str(r["id"]) for r in _lines(prediction_files(output_dir)) if not (retry_errors and r.get("error"))}


def merge_predictions(output_dir: str | os.PathLike, order: Optional[list[str]] = None) -> Path:
    """Merge the merged file and all shards into ``predictions.jsonl``: one line per id.

    For an id with several lines (DDP sampler padding, retried errors) the first line without an
    error wins, else the first line. Lines follow ``order`` (data-set ids), then any other ids in
    first-seen order. Written atomically; the shards are removed afterwards.
    """
    out = Path(output_dir)
    files = prediction_files(out)
    best: dict[str, dict] = {}
    for rec in _lines(files):
        rid = str(rec["id"])
        if rid not in best or (best[rid].get("error") and not rec.get("error")):
            best[rid] = rec
    ids = [i for i in (order or []) if i in best]
    ids += [i for i in best if i not in set(ids)]
    tmp = out / (PREDICTIONS + ".tmp")
    out.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        for rid in ids:
            fh.write(json.dumps(best[rid], ensure_ascii=False) + "\n")
    os.replace(tmp, out / PREDICTIONS)
    for shard in files:
        if shard.parent.name == SHARDS:
            shard.unlink(missing_ok=True)
    return out / PREDICTIONS


class PredictionWriter(Callback):
    """Writes one JSONL line per sample as its batch finishes; resumable and correct under DDP.

    * Lines go to ``<output_dir>/predictions.jsonl`` (one process) or to
      ``<output_dir>/shards/rank-<r>.jsonl`` (several), flushed per batch; at the end of the run
      rank 0 merges everything into ``predictions.jsonl`` with exactly one line per id, in data-set
      order (DistributedSampler padding and re-tried samples are de-duplicated).
    * Resuming: at setup, rank 0 reads the ids already written (merged file and shards of an
      interrupted run, a truncated last line dropped) and broadcasts them; the data module leaves
      them out (``datamodule.skip_ids``), so a re-run only does the missing samples. Samples whose
      line has an ``error`` are re-run too (``retry_errors``, default); ``retry_errors=False`` keeps
      those lines as final.
    """

    def __init__(self, output_dir: str, retry_errors: bool = True):
        super().__init__()
        self.output_dir = Path(output_dir)
        self.retry_errors = retry_errors
        self.skipped: set[str] = set()
        self.written = 0
        self._fh = None
        self._path: Path | None = None

    # -- setup -----------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        done: Any = None
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in prediction_files(self.output_dir):
                _repair(path)
            done = sorted(finished_ids(self.output_dir, self.retry_errors))
        done = trainer.strategy.broadcast(done, src=0)  # every rank filters the same ids
        self.skipped = set(done)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "skip_ids"):
            datamodule.skip_ids = set(self.skipped)
        if trainer.world_size > 1:
            self._path = self.output_dir / SHARDS / f"rank-{trainer.global_rank}.jsonl"
        else:
            self._path = self.output_dir / PREDICTIONS
        self.written = 0

    def _open(self):
        if self._fh is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            _repair(self._path)
            self._fh = open(self._path, "a", encoding="utf-8")
        return self._fh

    # -- writing ---------------------------------------------------------------------------
    def write(self, records: Iterable[dict]) -> None:
        fh = self._open()
        for rec in records or []:
            fh.write(json.dumps(_jsonable(rec), ensure_ascii=False) + "\n")
            self.written += 1
        fh.flush()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.write(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.write(outputs)

    # -- end -------------------------------------------------------------------------------
    def _finish(self, trainer) -> None:
        self.close()
        trainer.strategy.barrier("fvlm-predictions-written")
        if trainer.is_global_zero:
            datamodule = trainer.datamodule
            order = list(datamodule.ids) if datamodule is not None and hasattr(datamodule, "ids") else None
            merge_predictions(self.output_dir, order)
        trainer.strategy.barrier("fvlm-predictions-merged")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()


class StopOnSigterm(Callback):
    """Ends predict / test at the next batch boundary after SIGTERM (``kill``, a scheduler's grace signal).

    Lightning's handler only sets ``trainer.received_sigterm``, which its predict loop never reads;
    this raises Lightning's ``SIGTERMException`` once the batch's lines are written (list it after
    [`PredictionWriter`][fvlm.lightning.callbacks.PredictionWriter]), so the run stops with everything so far flushed and a rerun resumes.
    ``interrupted`` records a Ctrl-C (Lightning shuts down and exits on its own).
    """

    def __init__(self):
        super().__init__()
        self.interrupted = False

    def _check(self, trainer) -> None:
        if trainer.received_sigterm:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._check(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._check(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.interrupted = self.interrupted or isinstance(exception, KeyboardInterrupt)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


# -- efficiency --------------------------------------------------------------------------------
class EfficiencyMonitor(Callback):
    """The run's efficiency summary: means over every answered sample, gathered from all ranks.

    Each record's ``efficiency`` already holds the session trace's visual-token counts, the KV
    accounting and the prefill / decode timings of its batch
    ([`Answerer`][fvlm.answering.Answerer], one [`StepClock`][fvlm.profiling.timing.StepClock] per
    ``generate``), with ``unpruned_prefill_ms`` / ``unpruned_decode_ms`` when a fidelity pass ran
    the unpruned model on the batch. This callback keeps ``summary`` (the means over every sample
    of the run, ``summarize_efficiency``) and, with
    ``output_dir``, writes it to ``<output_dir>/efficiency.json``.
    """

    def __init__(self, output_dir: Optional[str] = None):
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir else None
        self.records: list[dict] = []
        self.summary: dict = {}

    def _start(self) -> None:
        self.records = []

    def _batch_end(self, outputs) -> None:
        for rec in outputs or []:
            if isinstance(rec, dict) and not rec.get("error") and isinstance(rec.get("efficiency"), dict):
                self.records.append({"efficiency": dict(rec["efficiency"])})

    def _end(self, trainer) -> None:
        records = self.records
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        self.summary = summarize_efficiency(records)
        if self.output_dir is not None and trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "efficiency.json").write_text(json.dumps(self.summary, indent=2))

    # hooks
    def on_predict_start(self, trainer, pl_module) -> None:
        self._start()

    def on_test_start(self, trainer, pl_module) -> None:
        self._start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(outputs)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._end(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._end(trainer)
