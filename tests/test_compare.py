"""``fvlm compare`` on the outputs of real ``fvlm run`` runs (built-in model), through the real CLI."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fvlm.commands import run as run_cmd
from fvlm.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["reference", "fastv-64", "random-64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    os.environ["FVLM_CACHE"] = str(root / "cache")
    try:
        for name in RECIPES:
            code = run_cmd.main(["-c", str(ROOT / "recipes/builtin" / f"{name}.yaml"), "--output", str(root / name),
                                 "--data.limit", "6", "--trainer.enable_progress_bar", "false"])
            assert code == 0
    finally:
        del os.environ["FVLM_CACHE"]
    return root


def fvlm(*argv, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="250")
    return subprocess.run([str(Path(sys.executable).with_name("fvlm")), *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def test_summary_records_the_method(runs):
    fastv = json.loads((runs / "fastv-64" / "summary.json").read_text())
    assert fastv["selector"] == "fastv" and fastv["positions"] == "original"
    assert fastv["selector_args"] == {"layer": 2, "keep": 64, "rounding": "round"}  # every argument, defaults too
    assert fastv["layer_average"] == fastv["efficiency"]["layer_average"] == (2 * 576 + 2 * 64) / 4
    reference = json.loads((runs / "reference" / "summary.json").read_text())
    assert reference["selector"] == "none" and reference["selector_args"] == {} and reference["positions"] is None
    assert reference["layer_average"] == 576.0


def test_compare_table_csv_markdown_and_plot(runs, tmp_path):
    dirs = [runs / name for name in RECIPES]
    out = tmp_path / "cmp"
    argv = ["compare", *dirs, "--csv", out / "table.csv", "--markdown", out / "table.md"]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", out / "plot.png"]
    except ImportError:
        pass
    proc = fvlm(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "fvlm compare" in proc.stdout and "fastv" in proc.stdout and "random" in proc.stdout
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    with open(out / "table.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["run"] for r in table] == [str(d) for d in dirs]
    assert [r["selector"] for r in table] == ["none", "fastv", "random"]
    ref_prefill = summaries[0]["efficiency"]["prefill_ms"]
    for row, summary in zip(table, summaries):
        assert float(row["accuracy"]) == pytest.approx(summary["accuracy"])
        assert float(row["layer_average"]) == pytest.approx(summary["layer_average"])
        assert float(row["kv_mib"]) == pytest.approx(summary["efficiency"]["kv_bytes"] / 2**20)
        assert float(row["speedup"]) == pytest.approx(ref_prefill / summary["efficiency"]["prefill_ms"])
        assert json.loads(row["args"] or "{}") == summary["selector_args"]
        paired = summary["efficiency"].get("prefill_speedup")  # fidelity runs: measured on the same batches
        assert (row["paired_speedup"] == "") if paired is None else float(row["paired_speedup"]) == pytest.approx(paired)
    assert table[0]["paired_speedup"] == "" and float(table[1]["paired_speedup"]) > 0  # reference: no fidelity pass
    assert float(table[0]["speedup"]) == 1.0 and float(table[2]["layer_average"]) == 64.0
    md = (out / "table.md").read_text().splitlines()
    assert md[0].startswith("| run | selector | args") and len(md) == 2 + len(dirs)
    assert '`{"layer":2,"keep":64,"rounding":"round"}`' in md[3]
    if "--plot" in argv:
        assert (out / "plot.png").stat().st_size > 1000


def test_compare_against_an_explicit_reference(runs):
    from fvlm.commands.compare import rows

    table = rows([runs / "fastv-64", runs / "random-64"], reference=runs / "random-64")
    assert table[1]["speedup"] == 1.0 and table[0]["speedup"] > 0
    assert rows([runs / "fastv-64"])[0]["speedup"] is None  # no unpruned run given: no speedup


def test_compare_refuses_a_folder_without_a_summary(tmp_path):
    proc = fvlm("compare", tmp_path)
    assert proc.returncode == 2 and "no summary.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _lmms_results(accuracy: float) -> dict:
    """A results file in the shape lmms-eval 0.7.3 writes (metric,filter keys; stderr entries; alias)."""
    return {"results": {"pope": {"alias": "pope", "pope_accuracy,none": accuracy, "pope_accuracy_stderr,none": 0.01,
                                 "pope_f1_score,none": 0.85, "pope_f1_score_stderr,none": "N/A"}},
            "n-samples": {"pope": {"original": 6, "effective": 6}}}


def test_compare_shows_the_lmms_eval_metrics_found_in_a_run_folder(runs, tmp_path):
    import shutil

    run = tmp_path / "fastv-64"
    shutil.copytree(runs / "fastv-64", run)
    (run / "builtin").mkdir()  # lmms-eval's --output_path run: MODEL/DATE_results.json; the newest wins
    (run / "builtin" / "20261101_090000_results.json").write_text(json.dumps(_lmms_results(0.5)))
    (run / "builtin" / "20261127_090000_results.json").write_text(json.dumps(_lmms_results(0.86)))
    out = tmp_path / "cmp"
    argv = ["compare", runs / "reference", run, "--csv", out / "table.csv", "--markdown", out / "table.md"]
    proc = fvlm(*argv)
    assert proc.returncode == 0, proc.stderr
    with open(out / "table.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        table = list(reader)
    names = reader.fieldnames
    assert names[names.index("accuracy") + 1:names.index("accuracy") + 3] == ["pope/pope_accuracy", "pope/pope_f1_score"]
    assert table[0]["pope/pope_accuracy"] == "" and float(table[1]["pope/pope_accuracy"]) == 0.86
    assert float(table[1]["pope/pope_f1_score"]) == 0.85 and "pope_accuracy_stderr" not in " ".join(names)
    assert "| pope/pope_accuracy |" in (out / "table.md").read_text()

    from fvlm.commands.compare import plotted_metric, rows

    table = rows([runs / "reference", run])
    assert plotted_metric(table, None) == "accuracy"  # fvlm's own scores are there
    assert plotted_metric(table, "pope/pope_f1_score") == "pope/pope_f1_score"
    with pytest.raises(UsageError, match="--metric nosuch: .*pope/pope_accuracy"):
        plotted_metric(table, "nosuch")
    lmms_only = rows([run])
    lmms_only[0]["accuracy"] = None  # an lmms-eval run: its summary has no fvlm accuracy
    with pytest.raises(UsageError, match="name the lmms-eval metric to draw with --metric"):
        plotted_metric(lmms_only, None)  # two metrics: which one is the user's choice
    del lmms_only[0]["scores"]["pope/pope_f1_score"]
    assert plotted_metric(lmms_only, None) == "pope/pope_accuracy"
