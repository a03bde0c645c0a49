"""The relational task, the isolated-turn packing of its training and the ground-truth selector."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from fvlm.builtin import relational, synthetic


# -- an independent interpreter of the question grammar (plain loops over the objects) -------------
def _cells(objects):
    return {o.cell: o for o in objects}


def _resolve(expr: str, objects, chain: list):
    """The object ``expr`` names, appending every object visited to ``chain``; asserts uniqueness."""
    if expr.startswith("the twin of "):
        inner = _resolve(expr[len("the twin of "):], objects, chain)
        same = [o for o in objects if o is not inner and o.colour == inner.colour]
        assert len(same) == 1, expr
        chain.append(same[0])
        return same[0]
    if expr.startswith("the shape in the "):
        region = expr[len("the shape in the "):]
        found = [o for o in objects if synthetic.region_name(o.cell) == region]
        assert len(found) == 1, expr
        chain.append(found[0])
        return found[0]
    for rel, (dr, dc) in (("left of", (0, -1)), ("right of", (0, 1)), ("above", (-1, 0)), ("below", (1, 0))):
        head = f"the shape {rel} "
        if expr.startswith(head):
            inner = _resolve(expr[len(head):], objects, chain)
            row, col = divmod(inner.cell, 3)
            assert 0 <= row + dr < 3 and 0 <= col + dc < 3, expr
            found = _cells(objects).get((row + dr) * 3 + col + dc)
            assert found is not None, expr
            chain.append(found)
            return found
    words = expr.split()
    assert len(words) == 3 and words[0] == "the", expr
    found = [o for o in objects if (o.colour, o.shape) == (words[1], words[2])]
    assert len(found) == 1, expr
    chain.append(found[0])
    return found[0]


def test_relational_answers_follow_from_the_question_and_the_scene():
    records = relational.dataset("test", 150)
    assert Counter(r["kind"] for r in records) == {k: 30 for k in relational.KINDS}
    for r in records:
        assert relational.MIN_OBJECTS <= len(r["objects"]) <= relational.MAX_OBJECTS
        question = r["question"]
        assert question.startswith("what ") and question.endswith(" ?")
        attribute, _, expr = question[len("what "):-2].partition(" is ")
        chain: list = []
        obj = _resolve(expr, r["objects"], chain)
        assert r["answer"] == getattr(obj, attribute)
        assert [id(o) for o in r["target"]] == [id(o) for o in chain]
        hops = {"region": 1, "rel": 2, "twin": 2, "rel_twin": 3, "twin_rel": 3}[r["kind"]]
        assert len(chain) == hops
        if r["kind"] == "rel_twin":  # never the anchor: its shape is in the question
            assert chain[-1] is not chain[0]
        if "twin" in r["kind"] and r["kind"] != "twin_rel":
            assert attribute == "shape"  # a twin's colour is in the question
    # the answer object is drawn where the generator says
    r = records[1]
    obj = r["target"][-1]
    x0, y0, x1, y1 = obj.box
    assert r["image"].getpixel(((x0 + x1) // 2, (y0 + 3 * y1) // 4)) == synthetic.COLOURS[obj.colour]


def test_relational_records_are_deterministic_and_their_own_stream():
    a, b = relational.sample("val", 11), relational.sample("val", 11)
    assert (a["question"], a["answer"], a["image"].tobytes()) == (b["question"], b["answer"], b["image"].tobytes())
    grounded = synthetic.sample("val", 11)
    assert grounded["image"].tobytes() != a["image"].tobytes()
    scene = relational.training_scene(4, questions=12)
    assert len(scene["qa"]) == 12 + len(synthetic.LISTINGS)
    assert {q for q, _ in scene["qa"][:12]} <= {q for q, _ in scene["qa"]}


def test_relational_vocabulary_covers_every_question():
    from fvlm.builtin import model as M

    tok = M.build_tokenizer(relational.vocabulary())
    for r in relational.dataset("train", 40):
        ids = tok(r["question"] + " " + r["answer"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
    # the grounded vocabulary's ids are unchanged by the default
    assert M.build_tokenizer().get_vocab() == M.build_tokenizer(synthetic.vocabulary()).get_vocab()


# -- isolated turns: single-turn training at the cost of one sequence per image ----------------------
@pytest.mark.parametrize("factor", [1, 4])
def test_isolated_turns_equal_single_turn_sequences(factor):
    from fvlm.builtin import model as M
    from fvlm.builtin import train

    processor = M.build_processor(M.build_tokenizer(relational.vocabulary()))
    model = M.build_model(M.build_config(processor.tokenizer, **M.SMOKE_SIZES)).eval()
    isolated = train.make_batch(processor, [0, 1], 0, 3, task="relational", isolated=True)
    single = train.make_batch(processor, [0, 1], 0, 3, task="relational")
    assert isolated["input_ids"].shape[0] == 2 and single["input_ids"].shape[0] == 2 * (3 + len(synthetic.LISTINGS))
    with torch.no_grad():
        packed_logits, packed_labels = train.lm_forward(model, isolated, factor)
        single_logits, single_labels = train.lm_forward(model, single, factor)
    # the same answer tokens in the same order, predicted from the same logits
    assert torch.equal(packed_labels[packed_labels != -100], single_labels[single_labels != -100])
    torch.testing.assert_close(packed_logits[packed_labels != -100], single_logits[single_labels != -100],
                               rtol=1e-4, atol=1e-5)


# -- the ground-truth selector ---------------------------------------------------------------------
def test_patch_order_puts_the_target_objects_first():
    from fvlm.builtin.oracle import patch_order

    record = relational.sample("test", 3)  # a rel question: anchor and neighbour
    order = patch_order(record)
    assert sorted(order) == list(range(576))
    cover = synthetic.coverage(record["objects"])
    columns = [record["objects"].index(o) for o in record["target"]]
    touched = {p for p in range(576) if any(cover[p, c] > 0 for c in columns)}
    assert set(order[: len(touched)]) == touched
    # the best-covered patch of each target object comes first, in the chain's order
    for i, c in enumerate(columns):
        assert cover[order[i], c] == cover[:, c].max()


def test_ground_truth_selector_keeps_the_first_patches_of_each_sample():
    import fvlm
    from fvlm.builtin import model as M
    from fvlm.builtin import prompt_inputs
    from fvlm.builtin.oracle import GroundTruthSelector, patch_order
    from fvlm.commands.visualize import StageRecorder

    processor = M.build_processor(M.build_tokenizer(relational.vocabulary()))
    model = M.build_model(M.build_config(processor.tokenizer, **M.SMOKE_SIZES)).eval()
    records = [relational.sample("test", i) for i in (1, 2)]
    orders = [patch_order(r) for r in records]
    inputs = prompt_inputs(processor, [r["image"] for r in records], [r["question"] for r in records])
    for where in ("input", 2):
        selector = GroundTruthSelector(20, where, orders)
        recorder = StageRecorder(selector)
        with fvlm.prune(model, selector) as session, torch.no_grad():
            model(**inputs)
        assert recorder.stages[0][1].tolist() == sorted(orders[0][:20])  # row 0 of the batch
        assert session.trace.visual_per_layer[1][-1] == 20
    with pytest.raises(fvlm.errors.FVLMError, match="patch orders for 1 samples"):
        with fvlm.prune(model, GroundTruthSelector(20, "input", orders[:1])), torch.no_grad():
            model(**inputs)
