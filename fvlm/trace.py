"""What a pruning session did during the last model call (prefill + decode steps)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fvlm.budget import layer_average


@dataclass
class StageRecord:
    """One stage of the last prefill: where it fired, per-sample budgets, its wall time, and what the
    selector noted (e.g. a fallback it took)."""

    where: str | int
    budget: list[int]
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class Trace:
    """Visual-token and KV-cache accounting for the last call, per sample where it can differ.

    ``visual_per_layer[b][i]`` counts the visual tokens in the input of decoder layer ``i``;
    ``prefill_length[i]`` is the cache length layer ``i`` stored in prefill (batch-wide, including
    padding); ``kv_length`` adds the decode steps. ``positions`` is the position policy that ran.
    """

    original_visual: list[int]
    llm_input_visual: list[int]
    visual_per_layer: list[list[int]]
    prefill_length: list[int]
    stages: list[StageRecord] = field(default_factory=list)
    decode_steps: int = 0
    positions: str = "original"

    @property
    def num_layers(self) -> int:
        return len(self.prefill_length)

    @property
    def kv_length(self) -> list[int]:
        return [n + self.decode_steps for n in self.prefill_length]

    @property
    def layer_average(self) -> list[float]:
        """Per sample: visual tokens averaged over all decoder layers (PyramidDrop convention)."""
        return [layer_average(row) for row in self.visual_per_layer]

    @property
    def layer_average_outputs(self) -> list[float]:
        """Per sample: visual tokens in each decoder layer's *output*, averaged over layers.

        A layer whose output is pruned counts at its post-prune size. This is the average
        SparseVLM's log prints next to its budgets (e.g. 192.03 for the authors' "192" schedule,
        whose layer average in the sense of [`layer_average`][fvlm.trace.Trace.layer_average] is 206.50).
        """
        return [(sum(row[1:]) + row[-1]) / len(row) for row in self.visual_per_layer]

    @property
    def mean_layer_average(self) -> float:
        return sum(self.layer_average) / max(len(self.layer_average), 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(kv_length=self.kv_length, layer_average=self.layer_average,
                   layer_average_outputs=self.layer_average_outputs)
        return out

    def __str__(self) -> str:
        stages = ", ".join(f"{s.where}:{s.budget} ({s.seconds * 1e3:.1f} ms)" for s in self.stages) or "none"
        return (
            f"Trace(visual tokens {self.original_visual} -> LLM input {self.llm_input_visual}, "
            f"layer average {[round(a, 2) for a in self.layer_average]}, stages {stages}, "
            f"KV length per layer {self.kv_length}, {self.positions} positions)"
        )
