"""Every file under recipes/ parses and validates (``fvlm run --print_config``); bad recipes name the key."""
import io
import contextlib
from pathlib import Path

import pytest
import yaml

import fvlm
from fvlm.commands import run as run_cmd

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TINY = RECIPES / "tiny"
# A complete recipe to compose fragments with (fragments hold one section each).
BASE = ["--model.backbone", str(RECIPES / "fragments/backbones/tiny-llava.yaml"),
        "--data", str(RECIPES / "fragments/data/tiny-vqa.yaml")]
SECTION = {"backbones": "--model.backbone", "selectors": "--model.selector", "data": "--data",
           "trainer": "--trainer", "generation": "--model.generation"}


def _yaml_files():
    return sorted(p for p in RECIPES.rglob("*.yaml"))


def _selector_names(value, base: Path) -> set:
    """Registry names a recipe (or fragment) refers to, following fragment paths."""
    names = set()
    if isinstance(value, str) and value.endswith(".yaml") and (base / value).is_file():
        return _selector_names(yaml.safe_load((base / value).read_text()), (base / value).parent)
    if isinstance(value, dict):
        if isinstance(value.get("name"), str) and "args" in value or set(value) == {"name"}:
            names.add(value["name"])
        for v in value.values():
            names |= _selector_names(v, base)
    elif isinstance(value, list):
        for v in value:
            names |= _selector_names(v, base)
    return names


def _argv(path: Path) -> list[str]:
    rel = path.relative_to(RECIPES)
    if rel.parts[0] == "fragments":
        section = SECTION[rel.parts[1]]
        extra = ["--model.selector", str(RECIPES / "fragments/selectors/tiny/random.yaml")] if section == "--model.backbone" else []
        return [*BASE, *extra, section, str(path)]
    return ["-c", str(path)]


def _main(argv, capsys):
    code = run_cmd.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_file_parses(path, capsys):
    data = yaml.safe_load(path.read_text())
    missing = sorted(_selector_names(data, path.parent) - set(fvlm.list_selectors()))
    if missing:
        pytest.skip(f"selector(s) {missing} not registered (yet): `fvlm list` does not show them")
    code, out, err = _main([*_argv(path), "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert {"model", "data", "trainer"} <= set(printed)
    if path.relative_to(RECIPES).parts[0] == "fragments":
        return
    # a complete recipe's printed config is itself a valid recipe (round trip)
    dumped = path.parent / f".roundtrip-{path.stem}.yaml"
    try:
        dumped.write_text(out)
        code2, out2, err2 = _main(["-c", str(dumped), "--print_config"], capsys)
    finally:
        dumped.unlink(missing_ok=True)
    assert code2 == 0, err2
    assert yaml.safe_load(out2)["model"] == printed["model"]


def test_experiment_files_cover_the_table():
    cells = {p.stem for p in (RECIPES / "llava-1.5-7b").glob("*.yaml")}
    for method in ("fastv", "sparsevlm", "dart", "visionzip", "divprune", "pio_fvlm", "pio_fvlm_encoder"):
        for budget in (192, 128, 64):
            assert f"{method}-{budget}" in cells
    assert "vanilla" in cells
    for path in (RECIPES / "llava-1.5-7b").glob("*.yaml"):
        text = path.read_text()
        assert text.count("<- EDIT") == 1 and "path: llava-hf/llava-1.5-7b-hf" in text


def test_short_names_and_class_paths_resolve(capsys):
    recipe = ["-c", str(TINY / "llava-reference.yaml")]
    forms = [
        ["--model.selector", "{name: uniform, args: {keep: 0.5}}"],
        ["--model.selector", "{class_path: UniformSelector, init_args: {keep: 0.5}}"],
        ["--model.selector", "{class_path: fvlm.selectors.basic.UniformSelector, init_args: {keep: 0.5}}"],
        ["--model.selector", "{name: fvlm.selectors.basic.UniformSelector, args: {keep: 0.5}}"],
    ]
    for form in forms:
        code, out, err = _main([*recipe, *form, "--print_config"], capsys)
        assert code == 0, err
        sel = yaml.safe_load(out)["model"]["selector"]
        args = sel.get("args", sel.get("init_args"))
        assert args["keep"] == 0.5 and args["layer"] == "input"  # defaults filled in


@pytest.mark.parametrize("override,key", [
    (["--model.backbone.dtyp", "float16"], "dtyp"),
    (["--model.generation.max_new_tokens", "many"], "model.generation.max_new_tokens"),
    (["--data.batch_size", "two"], "data.batch_size"),
    (["--data.metric", "bleu"], "data.metric"),
    (["--trainer.devicez", "1"], "devicez"),
    (["--mode", "train"], "mode"),
    (["--model.selector", "{name: random, args: {kep: 0.5}}"], "kep"),
    (["--model.selector", "{name: random, args: {seed: abc}}"], "model.selector.args.seed"),
    (["--model.selector", "{name: randon}"], "model.selector.name"),
    (["--model.selector", "{class_path: fvlm.selectors.basic.RandomSelector, init_args: {kep: 1}}"], "kep"),
])
def test_bad_values_name_the_key(override, key, capsys):
    code, out, err = _main(["-c", str(TINY / "llava-reference.yaml"), *override, "--print_config"], capsys)
    assert code == 2 and out == ""
    assert key in " ".join(err.split()), err


def test_unknown_key_in_a_recipe_file(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"backbone": {"path": "tiny:llava", "attn": "sdpa"}},
                                      "data": {"path": "x.jsonl"}}))
    code, _, err = _main(["-c", str(recipe), "--print_config"], capsys)
    assert code == 2 and "backbone.attn" in err
    recipe.write_text(yaml.safe_dump({"model": {"backbone": {"path": "tiny:llava"}, "fidelity": "sometimes"},
                                      "data": {"path": "x.jsonl"}}))
    code, _, err = _main(["-c", str(recipe), "--print_config"], capsys)
    assert code == 2 and "model.fidelity" in err


def test_unknown_selector_name_suggests(capsys):
    code, _, err = _main(["-c", str(TINY / "llava-reference.yaml"), "--model.selector", "{name: fastvv}",
                          "--print_config"], capsys)
    assert code == 2 and "fastvv" in err and "fastv" in err.replace("fastvv", "")


def test_gradient_selector_and_inference_mode(capsys):
    if "pio_fvlm" not in fvlm.list_selectors():
        pytest.skip("pio_fvlm is not registered")
    recipe = ["-c", str(TINY / "llava-pio_fvlm.yaml")]
    parser, cfg, selector, _ = run_cmd.parse(recipe)
    assert run_cmd.check_inference_mode(cfg, selector) is False  # chosen automatically
    code, _, err = _main([*recipe, "--trainer.inference_mode", "true", "--print_config"], capsys)
    assert code == 2 and "trainer.inference_mode" in err and "gradients" in err
    parser, cfg, selector, _ = run_cmd.parse(["-c", str(TINY / "llava-reference.yaml")])
    assert run_cmd.check_inference_mode(cfg, selector) is True


def test_fvlm_command_line_dispatches_run(capsys):
    from fvlm.cli import main

    assert main(["run", "-c", str(TINY / "llava-reference.yaml"), "--print_config"]) == 0
    assert "tiny:llava" in capsys.readouterr().out
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["run", "--help"]) == 0
    assert "--model.backbone.path" in out.getvalue() and "--trainer.strategy" in out.getvalue()


def test_default_output_folder():
    _, cfg, _, _ = run_cmd.parse(["-c", str(TINY / "llava-random.yaml")])
    assert run_cmd._default_output(cfg) == str(Path("outputs") / "llava-random" / "vqa")


@pytest.mark.parametrize("selector,key", [
    ("{name: random, args: {keep: -5}}", "`keep`"),
    ("{name: random, args: {keep: 16.5}}", "`keep`"),
    ("{name: random, args: {keep: 0.0}}", "`keep`"),
    ("{name: random, args: {keep: 0}}", "`keep`"),  # would silently remove every visual token
    ("{name: fastv, args: {keep: abc}}", "`keep`"),
    ("{name: visionzip, args: {dominant: -4}}", "`dominant` must be an int >= 1; got -4"),  # it counts the CLS token
    ("{class_path: fvlm.selectors.basic.RandomSelector, init_args: {keep: -5}}", "`keep`"),
])
def test_bad_selector_arguments_fail_when_the_recipe_is_parsed(selector, key, capsys):
    """Exit 2 with one line naming the parameter and its allowed range, before anything loads."""
    code, out, err = _main(["-c", str(TINY / "llava-reference.yaml"), "--model.selector", selector], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and key in err, err
    if "keep" in key:
        assert "an int count >= 1, or a float fraction in (0, 1]" in err


def test_trust_remote_code_is_off_by_default(capsys):
    code, out, err = _main(["-c", str(TINY / "llava-reference.yaml"), "--print_config"], capsys)
    assert code == 0 and yaml.safe_load(out)["model"]["backbone"]["trust_remote_code"] is False and err == ""


def test_keep_one_in_a_recipe_is_pointed_out(capsys):
    base = ["-c", str(TINY / "llava-reference.yaml"), "--print_config"]
    code, _, err = _main([*base, "--model.selector", "{name: random, args: {keep: 1}}"], capsys)
    assert code == 0 and "keep: 1 keeps ONE visual token per sample" in " ".join(err.split())
    code, out, err = _main([*base, "--model.selector", "{name: random, args: {keep: 1.0}}"], capsys)
    assert code == 0 and err == "" and yaml.safe_load(out)["model"]["selector"]["args"]["keep"] == 1.0


def _recipe(path: str):
    _, cfg, selector, _ = run_cmd.parse(["-c", str(RECIPES / path)])
    return cfg, selector, (RECIPES / path).read_text()


def test_cdpruner_vscan_and_pool_recipes_state_the_papers_settings():
    from fvlm.profiling import load_architecture, profile_stages
    from fvlm.selectors.cdpruner import CDPruner
    from fvlm.selectors.pio_fvlm import PIOFVLM
    from fvlm.selectors.vscan import VScan, VScanEncoder

    arch = load_architecture("llava-1.5-7b")
    for k in (192, 128, 64, 32):
        cfg, sel, _ = _recipe(f"llava-1.5-7b/cdpruner-{k}.yaml")
        assert isinstance(sel, CDPruner) and sel.keep == k and sel.text_model == "openai/clip-vit-large-patch14-336"
        assert sel.relevance_source == "auto" and cfg.model.positions is None and sel.positions == "compact"
    schedules = {64: (96, 32, False), 128: (192, 64, True), 192: (288, 96, True)}
    for avg, (encoder, keep, guess) in schedules.items():
        cfg, sel, text = _recipe(f"llava-1.5-7b/vscan-{avg}.yaml")
        assert isinstance(sel, VScan) and (sel.encoder_keep, sel.layer, sel.keep) == (encoder, 16, keep)
        assert sel.positions == "compact" and ("GUESS" in text) == guess
        assert profile_stages(arch, sel.stages(arch.info()), label="x").layer_average == avg
        cfg, sel, text = _recipe(f"llava-1.5-7b/pio_fvlm_encoder-{avg}.yaml")
        first, second = sel.selectors
        assert isinstance(first, VScanEncoder) and first.keep == encoder and first.local_layer is None
        assert isinstance(second, PIOFVLM) and second.layers == [16] and second.keep == [keep]
        assert sel.positions == "compact" and ("GUESS" in text) == guess
        assert profile_stages(arch, sel.stages(arch.info()), label="x").layer_average == avg
    for count, stride in ((144, 2), (64, 3)):
        cfg, sel, _ = _recipe(f"llava-1.5-7b/pool-{count}.yaml")
        assert sel.stride == stride and sel.stages(arch.info())[0].keep == count
    for total, k in ((640, 128), (320, 64), (160, 32)):
        cfg, sel, _ = _recipe(f"llava-next-7b/cdpruner-{total}.yaml")
        assert sel.keep == k and sel.positions == "compact"
    for k in (512, 256, 128):
        cfg, sel, text = _recipe(f"qwen2.5-vl-7b/cdpruner-{k}.yaml")
        assert sel.keep == k and sel.relevance_source == "auto" and cfg.model.positions is None
        assert "NOT A REPRODUCTION" in text
    cfg, sel, _ = _recipe("qwen2.5-vl-7b/vscan-11pct.yaml")
    assert (sel.encoder_keep, sel.layer, sel.keep) == (0.167, 14, 0.333) and cfg.model.positions is None
