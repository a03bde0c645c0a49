"""Reports of an analytic profile: a rich table, a JSON document, PNG plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from fvlm.errors import FVLMError
from fvlm.metrics.kv import MIB, dtype_bytes, kv_bytes_per_token
from fvlm.profiling.analytic import ProfileRow, format_schedule
from fvlm.profiling.arch import Architecture

PAPER_CONVENTION = (
    "paper convention: sum over layers of 4nd^2 + 2n^2d + 2ndm, n = visual tokens only "
    "(FastV / PDrop / PIO-FVLM tables; one multiply-add = 1)"
)
FULL_CONVENTION = (
    "full convention: 2 FLOPs per multiply-add of every matmul in the prefill: all tokens (text + visual), "
    "GQA projections, gated MLP, LM head on the last position, vision tower + projector, selector overhead"
)


def sig(value: float, digits: int = 4) -> str:
    """``digits`` significant digits without exponent notation (2.986, 16.67, 0.3257, 1234)."""
    if value == 0:
        return "0"
    from math import floor, log10

    decimals = max(0, digits - 1 - floor(log10(abs(value))))
    return f"{value:.{decimals}f}"


def ratio(reference: float, value: float) -> str:
    return f"{reference / value:.2f}x" if value else "-"


def kv_per_token(arch: Architecture, kv_dtype: str | None = None) -> int:
    width = dtype_bytes(kv_dtype or arch.kv_dtype)
    return kv_bytes_per_token(arch.text.num_layers, arch.text.num_kv_heads, arch.text.head_dim, width)


def header_lines(arch: Architecture, kv_dtype: str | None = None) -> list[str]:
    t, v = arch.text, arch.vision
    kv_dtype = kv_dtype or arch.kv_dtype
    per_token = kv_per_token(arch, kv_dtype)
    lines = [
        f"[bold]{arch.name}[/bold]: {arch.description}",
        f"text: {t.num_layers} layers, d={t.hidden_size}, m={t.intermediate_size}, {t.num_heads} heads "
        f"({t.num_kv_heads} KV), head_dim {t.head_dim}, vocab {t.vocab_size}",
    ]
    if v is not None:
        lines.append(f"vision: {v.kind}, {v.num_layers} layers, d={v.hidden_size}, m={v.intermediate_size}, "
                     f"images {arch.images}")
    lines.append(
        f"KV cache per token: {per_token / MIB:.6g} MiB ({kv_dtype}: {t.num_layers} layers x K,V x "
        f"{t.num_kv_heads} KV heads x {t.head_dim} x {dtype_bytes(kv_dtype)} B = {per_token} B)"
    )
    return lines


def profile_table(arch: Architecture, rows: Sequence[ProfileRow], decode_tokens: int = 0) -> Table:
    ref = next((r for r in rows if r.kind == "keep_all"), rows[0])
    title = (f"{arch.name}: {ref.counts.original} visual + {ref.text_tokens} text tokens per sample"
             + (f", KV after {decode_tokens} decode tokens" if decode_tokens else ""))
    table = Table(title=title)
    for name, justify in (("config", "left"), ("stages", "left"), ("LLM input visual", "right"),
                          ("layer avg", "right"), ("paper TFLOPs", "right"), ("x", "right"),
                          ("full TFLOPs", "right"), ("x", "right"), ("KV MiB", "right"), ("x", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        table.add_row(
            r.label, format_schedule(r.stages, r.counts.original), str(r.counts.llm_input), f"{r.layer_average:.2f}",
            sig(r.paper_flops / 1e12), ratio(ref.paper_flops, r.paper_flops),
            sig(r.full.total / 1e12), ratio(ref.full.total, r.full.total),
            f"{r.kv_bytes / MIB:.1f}", ratio(ref.kv_bytes, r.kv_bytes),
        )
    return table


def print_report(arch: Architecture, rows: Sequence[ProfileRow], console: Console | None = None,
                 decode_tokens: int = 0, kv_dtype: str | None = None) -> None:
    if console is None:
        from fvlm.console import console as _console

        console = _console()
    for line in header_lines(arch, kv_dtype):
        console.print(line)
    console.print(profile_table(arch, rows, decode_tokens))
    console.print(f"[dim]{PAPER_CONVENTION}[/dim]")
    console.print(f"[dim]{FULL_CONVENTION}[/dim]")
    console.print("[dim]layer avg: visual tokens averaged over all decoder layers (the papers' budgets); "
                  "KV: all tokens after prefill; x: keep-all / row[/dim]")


def report_dict(arch: Architecture, rows: Sequence[ProfileRow], decode_tokens: int = 0,
                kv_dtype: str | None = None) -> dict:
    ref = next((r for r in rows if r.kind == "keep_all"), rows[0])
    out_rows = []
    for r in rows:
        d = r.to_dict()
        d["vs_keep_all"] = {
            "paper_flops": ref.paper_flops / r.paper_flops if r.paper_flops else None,
            "full_flops": ref.full.total / r.full.total,
            "kv_bytes": ref.kv_bytes / r.kv_bytes,
        }
        out_rows.append(d)
    return {
        "model": arch.to_dict(),
        "kv_dtype": kv_dtype or arch.kv_dtype,
        "kv_bytes_per_token": kv_per_token(arch, kv_dtype),
        "decode_tokens": decode_tokens,
        "conventions": {"paper": PAPER_CONVENTION, "full": FULL_CONVENTION},
        "rows": out_rows,
    }


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# -- plots -------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise FVLMError("plots need matplotlib: pip install 'fvlm[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(rows: Sequence[ProfileRow]) -> dict[str, list[ProfileRow]]:
    """Rows by selector (one curve per selector across budgets); schedules and keep-all alone."""
    groups: dict[str, list[ProfileRow]] = {}
    for r in rows:
        groups.setdefault(r.selector or r.label, []).append(r)
    return groups


def plot_profile(arch: Architecture, rows: Sequence[ProfileRow], path: str | Path) -> Path:
    """Three panels: visual tokens per layer for each row; full-convention TFLOPs (and the paper
    convention, dashed) and KV MiB against the layer-average budget, one curve per selector."""
    plt = _pyplot()
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    groups = _groups(rows)
    for g, (name, members) in enumerate(groups.items()):
        color = colors[g % len(colors)]
        for j, r in enumerate(members):
            per = list(r.counts.per_layer)
            left.step(range(len(per) + 1), [*per, per[-1]], where="post", color=color,
                      linestyle=styles[j % len(styles)], label=f"{r.label} (avg {r.layer_average:.1f})")
        ordered = sorted(members, key=lambda r: r.layer_average)
        x = [r.layer_average for r in ordered]
        marker = "*" if name == "keep_all" else "o"
        mid.plot(x, [r.full.total / 1e12 for r in ordered], marker=marker, color=color, label=name)
        mid.plot(x, [r.paper_flops / 1e12 for r in ordered], marker=marker, color=color, linestyle="--", alpha=0.6)
        right.plot(x, [r.kv_bytes / MIB for r in ordered], marker=marker, color=color, label=name)
    left.set(xlabel="decoder layer", ylabel="visual tokens", title=f"{arch.name}: visual tokens per layer")
    left.legend(fontsize=6, ncol=2)
    mid.set(xlabel="visual tokens (layer average)", ylabel="TFLOPs per sample",
            title="prefill FLOPs: full convention (solid), paper (dashed)")
    right.set(xlabel="visual tokens (layer average)", ylabel="MiB per sample", title="KV cache after prefill")
    for ax in (mid, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
