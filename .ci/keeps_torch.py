"""Fail when installing fvlm into this environment would replace the torch it already has.

Usage: ``python .ci/keeps_torch.py [PIP_TARGET ...]`` (default ``.``), run with the environment's
own Python. It asks pip for the plan of ``pip install PIP_TARGET`` (``--dry-run --report``, nothing
is installed) and exits 1 when torch is in it: a user who installed a CUDA torch first must keep it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def install_plan(targets: list[str]) -> dict[str, str]:
    """``{name: version}`` of what ``pip install TARGETS`` would install here."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "plan.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                        *targets], check=True)
        items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in items}


def main(argv: list[str]) -> int:
    try:
        installed = version("torch")
    except PackageNotFoundError:
        print("keeps_torch: this environment has no torch; install one first", file=sys.stderr)
        return 2
    targets = argv or ["."]
    plan = install_plan(targets)
    listed = ", ".join(f"{name} {v}" for name, v in sorted(plan.items())) or "nothing"
    if "torch" in plan:
        print(f"keeps_torch: FAIL: `pip install {' '.join(targets)}` would replace torch {installed} "
              f"with torch {plan['torch']} (plan: {listed})", file=sys.stderr)
        return 1
    print(f"keeps_torch: pip keeps torch {installed}; `pip install {' '.join(targets)}` would install: {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
