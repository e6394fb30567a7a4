"""Recipes: every shipped YAML validates; bad ones fail with a message naming the key."""

from pathlib import Path

import pytest

from medcot_lib import recipe
from medcot_lib.errors import MedcotError

PARAMS = sorted(Path("params").glob("*.yaml"))


@pytest.mark.parametrize("path", PARAMS, ids=[p.name for p in PARAMS])
def test_every_recipe_validates(path):
    cfg = recipe.load(path)
    assert cfg.run_name
    assert path.read_text().startswith("#"), "a recipe opens with a comment giving its run command"
    assert f"medcot run {path.as_posix()}" in path.read_text()


def write_recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "run_name: t\ndataset_mixture:\n  - path: bundled:medical-o1\n"


def test_unknown_key_is_named_with_the_known_keys(tmp_path):
    with pytest.raises(MedcotError, match=r"lora_rr: unknown key \(known keys: .*dataset_mixture"):
        recipe.load(write_recipe(tmp_path, BASE + "lora_rr: 8\n"))


def test_unknown_key_inside_a_source_is_named(tmp_path):
    with pytest.raises(MedcotError, match=r"dataset_mixture\.0\.wieght: unknown key"):
        recipe.load(write_recipe(tmp_path, BASE + "    wieght: 0.5\n"))


@pytest.mark.parametrize("line, message", [
    ("seed: many", r"seed: Input should be a valid integer.*'many'"),
    ("min_cot_chars: -1", r"min_cot_chars: Input should be greater than or equal to 0"),
    ("prompt_style: chatty", r"prompt_style: Input should be 'think', 'instruction' or 'native'"),
    ("val_size: 0.6\ntest_size: 0.5", r"val_size \+ test_size ratios must leave training data"),
    ("val_size: 2.5", r"val_size: .*whole number"),
    ("run_name: 'bad name/'", r"run_name: String should match pattern"),
    ("layers_to_transform: [3, 3]", r"layers_to_transform: .*distinct layer indices"),
    ("layers_to_transform: [-1]", r"layers_to_transform: .*distinct layer indices"),
    ("eval_backend: fast", r"eval_backend: Input should be 'auto', 'hf', 'llamacpp' or 'vllm'"),
])
def test_bad_values_are_named(tmp_path, line, message):
    with pytest.raises(MedcotError, match=message):
        recipe.load(write_recipe(tmp_path, BASE + line + "\n"))


def test_missing_required_key_and_missing_files(tmp_path):
    with pytest.raises(MedcotError, match="run_name: required key is missing"):
        recipe.load(write_recipe(tmp_path, "seed: 1\n"))
    with pytest.raises(MedcotError, match="dataset_mixture: List should have at least 1 item"):
        recipe.load(write_recipe(tmp_path, "run_name: t\ndataset_mixture: []\n"))
    with pytest.raises(MedcotError, match=r"dataset_mixture\.0\.path: Value error, file not found: /nope/x.jsonl"):
        recipe.load(write_recipe(tmp_path, "run_name: t\ndataset_mixture:\n  - path: /nope/x.jsonl\n"))
    with pytest.raises(MedcotError, match="unknown bundled dataset 'bundled:nope'"):
        recipe.load(write_recipe(tmp_path, "run_name: t\ndataset_mixture:\n  - path: bundled:nope\n"))
    with pytest.raises(MedcotError, match="recipe file not found"):
        recipe.load(tmp_path / "absent.yaml")


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(MedcotError, match=r"r.yaml, line 4: not valid YAML \(while parsing a flow sequence"):
        recipe.load(write_recipe(tmp_path, BASE + "seed: [1, 2\n"))


def test_overrides_are_validated_too():
    cfg = recipe.load("params/cpu-demo.yaml", {"seed": 7})
    assert cfg.seed == 7
    with pytest.raises(MedcotError, match="max_length: Input should be greater than 0"):
        recipe.load("params/cpu-demo.yaml", {"max_length": 0})


def test_notebook_namespace_builds_the_same_recipe():
    cfg = recipe.load("params/cpu-demo.yaml")
    namespace = {**recipe.to_parameters(cfg), "run_dir": "x", "unrelated": 1}
    assert recipe.from_namespace(namespace) == cfg


def test_runner_makes_local_data_paths_absolute(tmp_path, monkeypatch):
    from medcot_lib import pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text("{}\n")
    cfg = recipe.validate({"run_name": "t", "dataset_mixture": [{"path": "mine.jsonl"}, {"path": "bundled:medqa"}]})
    fixed = pipeline.absolute_paths(cfg)
    assert [s.path for s in fixed.dataset_mixture] == [str(tmp_path / "mine.jsonl"), "bundled:medqa"]


def test_a_key_upstream_renamed_names_its_new_name(tmp_path):
    with pytest.raises(MedcotError, match="gradient_checkpointing: renamed activation_checkpointing"):
        recipe.load(write_recipe(tmp_path, BASE + "gradient_checkpointing: true\n"))


def test_latin1_recipe_names_file_line_and_key_and_the_cli_exits_2(tmp_path, capsys):
    from medcot_lib import cli

    path = tmp_path / "r.yaml"
    path.write_bytes(BASE.encode() + b"run_name: caf\xe9\n")
    with pytest.raises(MedcotError, match=r"r.yaml, line 4, field 'run_name': not valid UTF-8: byte 0xe9"):
        recipe.load(path)
    assert cli.main(["validate", str(path)]) == 2
    assert "line 4, field 'run_name': not valid UTF-8" in capsys.readouterr().err
