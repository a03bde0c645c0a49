"""CDPruner against a reference written from the spec (plain loops, one sample, float64 greedy MAP
by Schur complements with a linear solve), on LLaVA-1.5's, LLaVA-NeXT's and Qwen2.5-VL's layouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fvlm
from fvlm.selectors.algorithms import dpp_greedy_map
from fvlm.tiny_backbones import tiny_clip
from helpers import record
from layouts import (
    IMAGE,
    kept,
    llava15,
    llava15_inputs,
    llava_next,
    next_inputs,
    next_tokens,
    qwen25,
    qwen25_inputs,
)

QUESTIONS = ["What colour is the car on the left?",
             "Is there a dog in the picture? " + "Context: a long hint that needs a second CLIP row. " * 4]


@pytest.fixture(scope="module")
def llava():
    return llava15("sdpa", layers=2, hidden=512, vision_layers=2)


# ----------------------------------------------------------------------------------- reference
def greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy maximisation of log det K_S (float64): each step adds the token with the largest Schur
    complement ``K_jj - K_jS K_SS^-1 K_Sj`` (first index on ties), kept up to date with the explicit
    inverse of ``K_SS`` (block inversion) instead of Cholesky rows."""
    K = kernel.double()
    gains = K.diagonal().clone()
    chosen: list[int] = []
    inverse = K.new_zeros(k, k)
    columns = K.new_zeros(len(K), k)  # K[:, chosen]
    for t in range(k):
        free = gains.clone()
        free[chosen] = float("-inf")
        j = int(torch.argmax(free))  # the first maximal index
        u = inverse[:t, :t] @ columns[j, :t]
        s = float(K[j, j] - columns[j, :t] @ u)
        gains -= (K[:, j] - columns[:, :t] @ u).square() / s
        inverse[:t, :t] += torch.outer(u, u) / s
        inverse[:t, t] = inverse[t, :t] = -u / s
        inverse[t, t] = 1 / s
        columns[:, t] = K[:, j]
        chosen.append(j)
    return sorted(chosen)


def clip_text_rows(tokenizer, clip, text: str) -> torch.Tensor:
    """CLIP text embeddings of ``text`` cut into 77-token rows (BOS / EOS, zero padding)."""
    ids = tokenizer(text)["input_ids"]
    rows = []
    for start in range(0, len(ids), 77):
        chunk = ids[start:start + 77]
        row = torch.zeros(1, 77, dtype=torch.long)
        row[0, : len(chunk)] = torch.tensor(chunk)
        mask = torch.zeros(1, 77, dtype=torch.long)
        mask[0, : len(chunk)] = 1
        pooled = clip.text_model(input_ids=row, attention_mask=mask).pooler_output
        rows.append(clip.text_projection(pooled)[0])
    return torch.stack(rows)


def post_norm(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).post_layernorm


def relevance(patches: torch.Tensor, text: torch.Tensor, sign: float = -1.0) -> torch.Tensor:
    scores = []
    for v in patches:
        v = v / v.norm()
        scores.append(sign * sum(float(v @ (t / t.norm())) for t in text) / len(text))
    s = torch.tensor(scores, dtype=torch.float64)
    lo, hi = s.min(), s.max()
    return (s - lo + 1e-6) / (hi - lo)


def dpp_picks(features: torch.Tensor, quality: torch.Tensor, k: int) -> list[int]:
    x = features / features.norm(dim=-1, keepdim=True)
    q = quality.double()
    return greedy_logdet(q[:, None] * (x.double() @ x.double().T) * q[None, :], k)


def llava_reference(model, pixels: torch.Tensor, text: str, k: int) -> list[int]:
    """Kept indices (of 576) for one LLaVA-1.5 image, from the tower run by hand and a tiny CLIP."""
    clip, tokenizer = tiny_clip(model.config.vision_config.hidden_size)
    with torch.no_grad():
        tower = model.model.vision_tower(pixels[None], output_hidden_states=True)
        hidden = tower.hidden_states[-2][0, 1:]
        features = model.model.multi_modal_projector(hidden)
        patches = clip.visual_projection(post_norm(model)(hidden))
        quality = relevance(patches, clip_text_rows(tokenizer, clip, text))
    return dpp_picks(features, quality, k)


# ----------------------------------------------------------------------------------- algorithm
def test_greedy_map_equals_logdet_greedy_batched_and_guards_rank_deficient_kernels():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 50, 16, generator=gen)
    quality = torch.rand(3, 50, generator=gen) + 0.1
    valid = torch.ones(3, 50, dtype=torch.bool)
    valid[2, 40:] = False
    unit = F.normalize(feats, dim=-1)
    picks, stopped = dpp_greedy_map(unit, quality, valid, torch.tensor([10, 5, 12]))
    assert not stopped.any()
    for v, k in enumerate([10, 5, 12]):
        n = int(valid[v].sum())
        assert kept(picks, v) == dpp_picks(feats[v, :n], quality[v, :n], k)
    # an exactly degenerate kernel: 40 one-hot features of 6 classes, qualities 0.5 / 1 / 2 (exact
    # squares and roots), 10 picks: one per class by the greedy rule, then by quality (lowest index)
    classes = torch.randint(0, 6, (40,), generator=gen)
    classes[:6] = torch.arange(6)
    onehot = F.one_hot(classes, 6).float()[None]
    q = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (1, 40), generator=gen)]
    picks, stopped = dpp_greedy_map(onehot, q, torch.ones(1, 40, dtype=torch.bool), 10)
    assert bool(stopped[0]) and not torch.isnan(picks.float()).any()
    first = greedy_logdet(q[0, :, None] * (onehot[0] @ onehot[0].T) * q[0, None, :], 6)
    rest = [i for i in sorted(range(40), key=lambda i: (-float(q[0, i]), i)) if i not in first][:4]
    assert kept(picks, 0) == sorted(first + rest)


# -------------------------------------------------------------------------------------- LLaVA-1.5
@pytest.mark.parametrize("keep", [128, 64, 32])
def test_llava15_picks_equal_the_reference(llava, keep):
    inputs = llava15_inputs(seeds=(0,))
    selector = fvlm.create_selector("cdpruner", keep=keep, text_model="tiny:clip")
    calls = record(selector)
    with fvlm.prune(llava, selector, positions="compact", instructions=QUESTIONS[1:]) as session, torch.no_grad():
        llava.generate(**inputs, max_new_tokens=2)
    assert kept(calls[0], 0) == llava_reference(llava, inputs["pixel_values"][0], QUESTIONS[1], keep)
    assert session.trace.llm_input_visual == [keep] and session.trace.stages[0].notes == []


def test_batch_with_different_instructions_equals_per_sample_runs(llava):
    inputs = llava15_inputs(seeds=(0, 1), after=(20, 27))  # left padding, different images and texts
    selector = fvlm.create_selector("cdpruner", keep=64, text_model="tiny:clip")
    calls = record(selector)
    with fvlm.prune(llava, selector, instructions=QUESTIONS), torch.no_grad():
        llava(**inputs)
    for b in range(2):
        single = {k: v[b: b + 1] for k, v in inputs.items()}
        single["input_ids"] = single["input_ids"][:, single["attention_mask"][0].bool()]
        single["attention_mask"] = single["attention_mask"][:, single["attention_mask"][0].bool()]
        with fvlm.prune(llava, selector, instructions=QUESTIONS[b:b + 1]), torch.no_grad():
            llava(**single)
        assert kept(calls[0], b) == kept(calls[-1], 0)
    # each sample's relevance is its own: swapping the instructions changes the picks
    assert kept(calls[0], 0) == llava_reference(llava, inputs["pixel_values"][0], QUESTIONS[0], 64)
    assert kept(calls[0], 1) == llava_reference(llava, inputs["pixel_values"][1], QUESTIONS[1], 64)


def test_rank_deficient_kernel_is_filled_not_cut_and_noted():
    """All projector outputs equal (rank-1 kernel): the official loop goes NaN and keeps fewer than
    ``keep``; fvlm stops after the first pick and fills by quality (all 1 here: lowest indices)."""
    model = llava15("sdpa", layers=2, hidden=512, vision_layers=2)
    projector = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        projector.weight.zero_()
        projector.bias.copy_(F.one_hot(torch.tensor(3), projector.bias.shape[0]).float())
    selector = fvlm.create_selector("cdpruner", keep=32, relevance_source="none")
    calls = record(selector)
    with fvlm.prune(model, selector) as session, torch.no_grad():
        model.generate(**llava15_inputs(seeds=(2,)), max_new_tokens=2)
    assert kept(calls[0], 0) == list(range(32)) and session.trace.llm_input_visual == [32]
    assert "rank is below keep=32" in session.trace.stages[0].notes[0]


def test_sdpa_equals_eager(llava):
    inputs = llava15_inputs(seeds=(3,))
    picks = []
    for model in (llava, llava15("eager", layers=2, hidden=512, vision_layers=2)):
        selector = fvlm.create_selector("cdpruner", keep=64, text_model="tiny:clip")
        calls = record(selector)
        with fvlm.prune(model, selector, instructions=QUESTIONS[:1]), torch.no_grad():
            model(**inputs)
        picks.append(kept(calls[0], 0))
    assert picks[0] == picks[1]


def test_instructions_are_required_and_counted(llava):
    inputs = llava15_inputs(seeds=(0, 1), after=(20, 27))
    with pytest.raises(fvlm.FVLMError, match="instruction"):
        with fvlm.prune(llava, "cdpruner", keep=8, text_model="tiny:clip"):
            pass
    with pytest.raises(fvlm.FVLMError, match="1 instructions for a batch of 2"):
        with fvlm.prune(llava, "cdpruner", keep=8, text_model="tiny:clip", instructions=["one"]), torch.no_grad():
            llava(**inputs)
    with pytest.raises(fvlm.errors.AuxiliaryModelError, match="cannot load auxiliary model"):
        with fvlm.prune(llava, "cdpruner", keep=8, text_model="/nonexistent/clip", instructions=["a"]):
            pass


# -------------------------------------------------------------------------------------- LLaVA-NeXT
@pytest.mark.parametrize("keep", [128, 64, 32])
def test_llava_next_runs_per_crop_with_one_relevance_range_and_follows_the_unpadding(keep):
    model = llava_next("sdpa")
    inputs = next_inputs(sizes=((500, 700),))
    count, crops, rows, cols = next_tokens(500, 700)
    selector = fvlm.create_selector("cdpruner", keep=keep, text_model="tiny:clip")
    calls = record(selector)
    with fvlm.prune(model, selector, instructions=QUESTIONS[:1]) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    clip, tokenizer = tiny_clip(32)
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"][0, :crops], output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = model.model.multi_modal_projector(hidden)  # [5, 576, D]
        patches = clip.visual_projection(post_norm(model)(hidden))
        quality = relevance(patches.flatten(0, 1), clip_text_rows(tokenizer, clip, QUESTIONS[0])).view(crops, 576)
    top = (48 - rows) // 2  # 2 x 2 tiles, rows cut symmetrically by the unpadding
    expected = list(dpp_picks(feats[0], quality[0], keep))  # base crop: LLM positions 0..575
    for tile in range(1, crops):
        ti, tj = divmod(tile - 1, 2)
        for p in dpp_picks(feats[tile], quality[tile], keep):
            r, c = ti * 24 + p // 24 - top, tj * 24 + p % 24
            if 0 <= r < rows:
                expected.append(576 + r * (cols + 1) + c)
    expected += [576 + r * (cols + 1) + cols for r in range(rows)]  # newline tokens stay
    assert kept(calls[0], 0) == sorted(expected)
    assert session.trace.llm_input_visual == [len(expected)] and len(expected) < crops * keep + rows


# -------------------------------------------------------------------------------------- Qwen2.5-VL
def test_qwen25_llm_embed_default_equals_the_reference():
    """Not a reproduction (no official Qwen code): the labelled default, relevance from the LLM
    embeddings of the prompt's text after the image, at the paper's 512 / 256 / 128 of 1,296."""
    model = qwen25("sdpa", layers=1, hidden=1024, vision_hidden=192, full=())  # merger rank up to 769 > keep
    inputs = qwen25_inputs(grids=((36, 36),))
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        merged = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        first_image = int((ids == IMAGE).nonzero()[0])
        text = model.get_input_embeddings()(ids[first_image:][ids[first_image:] != IMAGE])
    quality = relevance(merged, text)
    for keep in (512, 256, 128):
        selector = fvlm.create_selector("cdpruner", keep=keep)
        calls = record(selector)
        with fvlm.prune(model, selector) as session, torch.no_grad():
            model(**inputs)
        assert selector.needs == {fvlm.Need.GRID, fvlm.Need.VISION_FEATURES, fvlm.Need.TEXT}
        assert kept(calls[0], 0) == dpp_picks(merged, quality, keep)
        assert session.trace.llm_input_visual == [keep]


# ------------------------------------------------------------------------------- fvlm run, the CLI
def test_fvlm_run_gives_cdpruner_each_samples_question(tmp_path):
    """``fvlm run`` (its entry point, in process) passes every sample's question, with its options and
    without the answer-format prompt, as the instruction: its answers equal generate under
    ``fvlm.prune(..., instructions=[that text])`` one sample at a time, and other instructions would
    change some of them."""
    import json
    from pathlib import Path

    from fvlm.cli import main
    from fvlm.lightning.data import VQACollator, VQADataset, instruction_text, load_records
    from fvlm.tiny_backbones import tiny_backbone

    root = Path(__file__).resolve().parents[1]
    data = root / "recipes/tiny/data/vqa.jsonl"
    assert main(["run", "-c", str(root / "recipes/tiny/llava-cdpruner.yaml"), "--output", str(tmp_path),
                 "--trainer.enable_progress_bar", "false"]) == 0
    answers = {r["id"]: r["answer"] for r in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    model, processor = tiny_backbone("llava")
    collate = VQACollator(processor)
    records = load_records(data)
    changed = 0
    for i, rec in enumerate(records):
        inputs = collate([VQADataset(records)[i]])["inputs"]
        for text in (instruction_text(rec), "A completely different instruction about something else"):
            with fvlm.prune(model, "cdpruner", keep=4, text_model="tiny:clip", instructions=[text]), torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            if text == instruction_text(rec):
                assert answer == answers[rec["id"]], rec["id"]
            else:
                changed += answer != answers[rec["id"]]
    assert "\nA. " in instruction_text(next(r for r in records if r.get("choices")))
    assert changed > 0
