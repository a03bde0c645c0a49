"""The one generation path (fvlm.answering), session listeners, the gradient check at session entry and
the selector spec round trip."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import fvlm
import fvlm.backbones
from fvlm.answering import Answerer, Prompt, build_inputs
from fvlm.selectors.spec import SelectorSpec, selector_arguments
from fvlm.tiny_backbones import families, tiny_backbone
from helpers import EveryOther, FixedSelector, GradientNorm

SIZES = [(32, 32), (48, 64), (40, 24)]


def _prompts() -> list[Prompt]:
    """Three prompts of different lengths with 1, 2 and 0 images (left padding, a text-only row)."""
    images = [Image.new("RGB", (w, h), (40 * i, 120, 200 - 30 * i)) for i, (h, w) in enumerate(SIZES)]
    return [Prompt([images[0]], "What colour?"), Prompt(images[1:], "Which of the two is larger, and why?"),
            Prompt([], "Say hi.")]


@pytest.fixture(scope="module", params=families())  # every family with a tiny model and processor
def backbone(request):
    model, processor = tiny_backbone(request.param)
    fvlm.backbones.prepare(model, processor)
    return model, processor


def _plain(model, processor, prompts, tokens):
    inputs = build_inputs(processor, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)], inputs


def test_answers_are_plain_generate_and_keep_all_changes_nothing(backbone):
    """Plumbing oracle: the answerer's texts are processor + generate + decode of a plain call, and
    keep-all under the session reproduces them exactly (several images, a text-only row, left padding)."""
    model, processor = backbone
    prompts = _prompts()
    expected, inputs = _plain(model, processor, prompts, 4)
    assert inputs["attention_mask"][:, 0].tolist().count(0) >= 1  # padded on the left
    with torch.no_grad():
        plain = Answerer(model, processor, generation={"max_new_tokens": 4}).answer(prompts)
        kept = Answerer(model, processor, fvlm.create_selector("keep_all"), generation={"max_new_tokens": 4}).answer(prompts)
    assert [r["answer"] for r in plain] == [r["answer"] for r in kept] == expected
    image_token = model.config.image_token_id
    for r, row in zip(plain, inputs["input_ids"]):
        eff = r["efficiency"]
        assert eff["visual_tokens"] == int((row == image_token).sum())
        assert eff["layer_average"] == eff["visual_tokens"]  # unpruned: every layer sees every token
        assert eff["prefill_ms"] > 0 and eff["batch_size"] == 3
        assert eff["batch_decode_steps"] == 3  # one StepClock: the first forward is the prefill, 3 decode steps
    assert [r["efficiency"]["visual_per_layer"] for r in kept] == [r["efficiency"]["visual_per_layer"] for r in plain]


def test_answer_all_keeps_input_order_and_batches_like_answer(backbone):
    model, processor = backbone
    prompts = _prompts()
    answerer = Answerer(model, processor, generation={"max_new_tokens": 3})
    with torch.no_grad():
        one_by_one = [answerer.answer([p])[0]["answer"] for p in prompts]
        assert [r["answer"] for r in answerer.answer_all(prompts, batch_size=1)] == one_by_one
        assert len(answerer.answer_all(prompts, batch_size=2)) == 3


def test_generate_kwargs_override_the_settings(backbone):
    model, processor = backbone
    answerer = Answerer(model, processor, generation={"max_new_tokens": 2})
    with torch.no_grad():
        short = answerer.answer(_prompts()[:1])[0]
        longer = answerer.answer(_prompts()[:1], max_new_tokens=5, min_new_tokens=5)[0]
    assert short["efficiency"]["batch_decode_steps"] <= 1 and longer["efficiency"]["batch_decode_steps"] == 4
    assert longer["efficiency"]["new_tokens"] == 5


def test_fidelity_of_keep_all_is_perfect_and_its_unpruned_pass_timed_apart(backbone):
    """keep_all's answers and first-token distribution equal the unpruned pass's; with fidelity, the
    unpruned generate of the same batch is timed by its own clock (its prefill and decode steps, apart
    from the pruned pass's); without it there is no baseline."""
    model, processor = backbone
    answerer = Answerer(model, processor, fvlm.create_selector("keep_all"), generation={"max_new_tokens": 3},
                        fidelity=True)
    with torch.no_grad():
        results = answerer.answer(_prompts()[:2])
    for r in results:
        assert r["reference_answer"] == r["answer"] and r["first_token_top1"] is True
        assert r["first_token_kl"] == pytest.approx(0.0, abs=1e-6)
        eff = r["efficiency"]
        assert eff["unpruned_prefill_ms"] > 0 and eff["unpruned_decode_ms"] > 0
        assert eff["batch_unpruned_decode_steps"] == eff["batch_decode_steps"] == 2
    with torch.no_grad():
        plain = Answerer(model, processor, generation={"max_new_tokens": 3}).answer(_prompts()[:2])
    assert all("unpruned_prefill_ms" not in r["efficiency"] for r in plain)  # no fidelity pass, no baseline


def test_first_logprobs_are_the_first_generated_tokens_distribution(backbone):
    """``first_logprobs``: log-softmax of ``generate``'s first-step logits of each prompt, the same
    with or without a keep-all session, and its argmax is the first generated token."""
    model, processor = backbone
    prompts = _prompts()
    inputs = build_inputs(processor, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        plain = Answerer(model, processor, generation={"max_new_tokens": 2}, first_logprobs=True).answer(prompts)
        kept = Answerer(model, processor, fvlm.create_selector("keep_all"), generation={"max_new_tokens": 2},
                        first_logprobs=True).answer(prompts)
    expected = out.logits[0].float().log_softmax(dim=-1)
    for b, (p, k) in enumerate(zip(plain, kept)):
        assert p["first_logprobs"].dtype == torch.float32 and p["first_logprobs"].device.type == "cpu"
        torch.testing.assert_close(p["first_logprobs"], expected[b])
        torch.testing.assert_close(k["first_logprobs"], expected[b], atol=1e-5, rtol=1e-5)
        assert int(p["first_logprobs"].argmax()) == int(out.sequences[b, inputs["input_ids"].shape[1]])


def test_answer_all_builds_each_batchs_selector_from_its_prompt_indices():
    """``selector_for(chunk)`` gets the input indices of each length-sorted batch and prunes exactly
    that batch: every result equals answering its batch alone with that selector."""
    model, processor = tiny_backbone("llava")
    fvlm.backbones.prepare(model, processor)
    images = [Image.new("RGB", (32, 32), (30 * i, 90, 160)) for i in range(5)]
    prompts = [Prompt([im], "Colour?" + " please" * (i % 3)) for i, im in enumerate(images)]
    n_vis = int((build_inputs(processor, prompts[:1])["input_ids"] == model.config.image_token_id).sum())
    seen = []

    def selector_for(chunk):
        seen.append(list(chunk))
        return FixedSelector([[(i + j) % n_vis for j in range(3)] for i in chunk])

    answerer = Answerer(model, processor, generation={"max_new_tokens": 3})
    with torch.no_grad():
        results = answerer.answer_all(prompts, batch_size=2, selector_for=selector_for)
        assert sorted(i for chunk in seen for i in chunk) == list(range(5)) and all(len(c) <= 2 for c in seen)
        for chunk in seen:
            alone = answerer.answer([prompts[i] for i in chunk], selector=FixedSelector(
                [[(i + j) % n_vis for j in range(3)] for i in chunk]))
            assert [results[i]["answer"] for i in chunk] == [r["answer"] for r in alone]
            assert all(results[i]["efficiency"]["llm_input_visual"] == 3 for i in chunk)
    assert answerer.selector is None  # the answerer's own selector is untouched


class Recorder:
    def __init__(self):
        self.calls = []

    def on_stage(self, stage, ctx, selection):
        self.calls.append((stage.where, selection.indices.tolist(), ctx.num_visual.tolist()))


def test_listeners_see_every_answered_stage(model_cache):
    from fvlm.testing import tiny_inputs

    model = model_cache("llava")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2))
    recorder = Recorder()
    with fvlm.prune(model, FixedSelector([[3, 1, 0], [5, 2, 7]]), listeners=[recorder]), torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert recorder.calls == [("input", [[3, 1, 0], [5, 2, 7]], [16, 32])]  # once, in prefill, as selected
    multi = Recorder()
    session = fvlm.PruningSession(model, EveryOther([(1, 8), (2, 4)]))
    session.listen(multi)
    with session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert [c[0] for c in multi.calls] == [1, 2] and [len(c[1][0]) for c in multi.calls] == [8, 4]
    text_only = Recorder()
    with fvlm.prune(model, "random", keep=4, listeners=[text_only]), torch.no_grad():
        model.generate(input_ids=torch.tensor([[20, 21, 22]]), max_new_tokens=2, do_sample=False)
    assert text_only.calls == []  # nothing to choose: the selector is not asked, no listener is told
    with pytest.raises(TypeError, match="on_stage"):
        fvlm.prune(model, "random", listeners=[print])


class InstructionRecorder:
    def __init__(self):
        self.seen = []

    def on_stage(self, stage, ctx, selection):
        self.seen.append(list(ctx.instructions))


def test_each_prompt_gives_its_instruction_to_an_instruction_conditioned_selector():
    """CDPruner (``Need.INSTRUCTION``) reads one instruction per prompt: ``Prompt.instruction`` where
    given, else the prompt's text; answers equal ``fvlm.prune(..., instructions=...)`` around generate."""
    model, processor = tiny_backbone("llava")
    fvlm.backbones.prepare(model, processor)
    prompts = _prompts()[:2]
    prompts[0].instruction = "What colour is it?"
    recorder = InstructionRecorder()
    selector = fvlm.create_selector("cdpruner", keep=4, text_model="tiny:clip")
    answerer = Answerer(model, processor, selector, generation={"max_new_tokens": 3}, listeners=[recorder])
    with torch.no_grad():
        answers = [r["answer"] for r in answerer.answer(prompts)]
    expected = ["What colour is it?", prompts[1].text]
    assert recorder.seen == [expected]
    inputs = build_inputs(processor, prompts)
    with fvlm.prune(model, selector, instructions=expected), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert answers == [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def test_gradient_selector_is_refused_when_the_session_is_entered_under_inference_mode(model_cache):
    model = model_cache("llava")
    session = fvlm.prune(model, GradientNorm())
    with torch.inference_mode():
        with pytest.raises(fvlm.GradientUnavailableError, match="inference_mode"):
            session.__enter__()
    assert session._handles == []  # nothing attached


@pytest.mark.parametrize("name", fvlm.list_selectors())
def test_selector_arguments_rebuild_the_same_selector(name):
    """What a summary records (every argument, defaults included) builds the selector again."""
    cls = fvlm.registry.get_selector_class(name)
    selector = fvlm.create_selector(name, **cls.example_kwargs)
    args = selector_arguments(selector)
    assert json.loads(json.dumps(args)) == args  # plain JSON
    assert set(args) >= set(cls.example_kwargs)
    again = SelectorSpec(name, args).build()
    assert type(again) is type(selector) and selector_arguments(again) == args
