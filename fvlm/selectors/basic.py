"""Reference selectors every comparison should carry: keep-all, seeded random, spatially uniform, pooling."""
from __future__ import annotations

import torch

from fvlm.errors import FVLMError
from fvlm.selectors.arguments import check_int, check_keep, check_where
from fvlm.selectors.base import Need, ScoreSelector, Selection, Stage, TokenSelector


class KeepAll(TokenSelector):
    """Identity: keeps every visual token (the unpruned reference and test oracle)."""

    def __init__(self, layer: int | str = "input"):
        self.layer = check_where(self, layer)

    def stages(self, info):
        return [Stage(self.layer, 1.0)]

    def select(self, ctx):
        return torch.where(ctx.visual_valid, torch.arange(ctx.visual_index.shape[1], device=ctx.hidden.device), -1)


class RandomSelector(ScoreSelector):
    """Keeps a seeded uniformly random subset of the visual tokens (same seed, same picks).

    Every sample draws from the same seeded stream, so its picks do not depend on its place in the
    batch (a prompt's beams, or the prompt run alone, keep the same tokens).
    """

    def __init__(self, keep: int | float = 0.25, layer: int | str = "input", seed: int = 0):
        self.keep = check_keep(self, keep)
        self.layer = check_where(self, layer)
        self.seed = check_int(self, seed, "seed")

    def stages(self, info):
        return [Stage(self.layer, self.keep)]

    def score(self, ctx):
        gen = torch.Generator().manual_seed(self.seed)
        bsz, width = ctx.visual_index.shape
        return torch.rand(width, generator=gen).expand(bsz, width).to(ctx.hidden.device)


class UniformSelector(TokenSelector):
    """Keeps visual tokens at an even spatial stride over each image's patch grid.

    Budgets are split across a sample's images in proportion to their token counts; within an
    image, rows and columns are sampled evenly on its 2-D grid (a 1-D stride where no grid is known).
    """

    needs = frozenset({Need.GRID})

    def __init__(self, keep: int | float = 0.25, layer: int | str = "input"):
        self.keep = check_keep(self, keep)
        self.layer = check_where(self, layer)

    def stages(self, info):
        return [Stage(self.layer, self.keep)]

    def select(self, ctx):
        from fvlm.selectors.algorithms import uniform_indices

        grids = ctx.grids
        rows = []
        for b in range(ctx.hidden.shape[0]):
            n, k = int(ctx.num_visual[b]), int(ctx.budget[b])
            original = sum(g.length for g in grids[b]) if b < len(grids) else 0
            if original != n or not grids[b]:  # already pruned: no grid left, use a 1-D stride
                picks = uniform_indices(torch.tensor([n]), torch.tensor([k]))[0].tolist() if k else []
            else:
                picks = _grid_picks(grids[b], k)
            rows.append(picks)
        width = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(ctx.hidden.device)


def _grid_picks(grids, k: int) -> list[int]:
    """Split ``k`` across images by size (largest remainder), then stride evenly on each grid."""
    from fvlm.selectors.algorithms import uniform_indices

    total = sum(g.length for g in grids)
    shares = [k * g.length / total for g in grids]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(grids)), key=lambda i: counts[i] - shares[i])[: k - sum(counts)]:
        counts[i] += 1
    picks = []
    for g, c in zip(grids, counts):
        if c == 0:
            continue
        grid = (g.rows, g.cols) if g.rows * g.cols == g.length else None  # e.g. LLaVA-NeXT tiles: 1-D
        local = uniform_indices(torch.tensor([g.length]), torch.tensor([c]), grid=grid)[0]
        picks.extend((local[local >= 0] + g.offset).tolist())
    return sorted(picks)


class Pool(TokenSelector):
    """Average pooling of each image's token grid in ``stride x stride`` blocks (a control baseline).

    Every block of the grid the language model sees becomes one token: the mean of its tokens
    (float32, in the LLM input space), placed at the block's top-left token, so the pooled tokens
    follow the grid's raster order. With ``positions="compact"`` (LLaVA) the LLM then sees exactly the
    layout of an image ``stride`` times smaller; Qwen keeps each block's top-left M-RoPE position
    (original positions). The last block row / column is smaller when ``stride`` does not divide the
    grid. LLaVA-NeXT: the base tile and the high-resolution grid are pooled separately and each pooled
    row keeps one newline token (the one closing the block's last row). A sample keeps
    ``ceil(rows / stride) * ceil(cols / stride)`` tokens per grid (144 of 576 at stride 2).
    """

    needs = frozenset({Need.GRID})
    example_kwargs = {"stride": 2}
    positions = "compact"  # the pooled grid's own layout (M-RoPE backbones keep original ids)

    def __init__(self, stride: int = 2, layer: int | str = "input"):
        self.stride = check_int(self, stride, "stride", minimum=1)
        self.layer = check_where(self, layer)

    def stages(self, info):
        side = int(round(info.view_tokens**0.5))
        if info.view_tokens and side * side == info.view_tokens:
            return [Stage(self.layer, (-(-side // self.stride)) ** 2)]
        return [Stage(self.layer, 1.0 / self.stride**2)]

    def _plan(self, layout) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Tokens kept as they are (newlines of pooled rows, tokens outside every grid) and, per grid,
        its block anchors and the grid's positions."""
        s = self.stride
        covered = torch.zeros(layout.num_visual, dtype=torch.bool)
        plain, pooled = [], []
        for grid in layout.grids:
            covered[grid.index.flatten()] = True
            if grid.newline is not None:
                covered[grid.newline] = True
                plain += grid.newline[[min(grid.rows, r + s) - 1 for r in range(0, grid.rows, s)]].tolist()
            pooled.append((grid.index[::s, ::s], grid.index))
        plain += (~covered).nonzero().flatten().tolist()
        return plain, pooled

    def stage_budget(self, ctx):
        counts = []
        for b, layout in enumerate(ctx.layout):
            if int(ctx.num_visual[b]) != layout.num_visual:
                raise FVLMError("pool needs each image's full grid: it must be the first stage that prunes")
            plain, pooled = self._plan(layout)
            counts.append(len(plain) + sum(a.numel() for a, _ in pooled))
        return torch.tensor(counts, dtype=torch.long, device=ctx.hidden.device)

    def select(self, ctx):
        from fvlm.selectors.algorithms import block_pool

        rows = []
        for b, layout in enumerate(ctx.layout):
            x = ctx.visual_hidden[b]
            plain, pooled = self._plan(layout)
            entries = [(p, x[p]) for p in plain]
            for _, index in pooled:
                anchors, means = block_pool(x, index, self.stride)
                entries += list(zip(anchors.flatten().tolist(), means.flatten(0, 1)))
            rows.append(entries)
        return Selection.from_rows(rows, ctx.hidden)
