"""Notebook hygiene: clean, parseable, one typed parameters cell, a guarded install cell, defaults = cpu-demo."""

import ast
import json
import tomllib
from pathlib import Path

import pytest
import yaml

from medcot_lib import recipe

NOTEBOOKS = sorted(Path("notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
# The worked solutions (solutions/*.ipynb, tests/test_solutions.py) keep the same hygiene: clean, parseable, one
# parameters cell of typed, commented literals, no sys.path editing.
WITH_SOLUTIONS = NOTEBOOKS + sorted(Path("solutions").glob("*.ipynb"))
ALL_IDS = [str(p) for p in WITH_SOLUTIONS]


def cells(path):
    return json.loads(path.read_text())["cells"]


def code(cell):
    return "".join(cell["source"])


def parameters_cell(path):
    return [c for c in cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_there_are_stage_notebooks():
    assert "00_dataset_inspection.ipynb" in IDS


@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=ALL_IDS)
def test_committed_clean(path):
    for cell in cells(path):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path}: commit notebooks without outputs"


@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=ALL_IDS)
def test_every_code_cell_parses(path):
    for cell in cells(path):
        if cell["cell_type"] == "code":
            ast.parse(code(cell))


@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=ALL_IDS)
def test_exactly_one_parameters_cell_of_typed_commented_literals(path):
    (cell,) = parameters_cell(path)
    tree = ast.parse(code(cell))
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{path}: parameters cell holds only `name: type = literal  # comment`"
        ast.literal_eval(node.value)
    lines = [line for line in code(cell).splitlines() if line.strip()]
    assert all("  # " in line for line in lines), f"{path}: every parameter has a comment"
    assert cells(path).index(cell) <= 3, "the parameters cell comes first, after the introduction and install cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_install_cell_is_guarded_and_mirrors_the_project_url(path):
    install = code(cells(path)[1])
    url = tomllib.loads(Path("pyproject.toml").read_text())["project"]["urls"]["Repository"]
    extras = {"00b_": "[gguf]", "05_": "[gguf]", "06_": "[chat]"}  # 00b's llama.cpp teacher, 05's GGUF export, 06's app
    extra = next((e for prefix, e in extras.items() if path.name.startswith(prefix)), "")
    assert f"medcot{extra} @ git+{url}" in install
    assert 'if HOSTED and importlib.util.find_spec("medcot_lib") is None:' in install
    assert "install-embedded" in install
    pip_calls = [line for line in install.splitlines() if '"pip", "install"' in line]
    for call in pip_calls:  # the hosted torch/CUDA pairing is never touched
        assert "torch" not in call and not any(flag in call for flag in ("-U", "--upgrade", "--force-reinstall"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_parameter_defaults_are_the_cpu_demo_recipe(path):
    demo = recipe.to_parameters(recipe.load("params/cpu-demo.yaml"))
    defaults = {node.target.id: ast.literal_eval(node.value) for node in ast.parse(code(parameters_cell(path)[0])).body}
    for key, value in defaults.items():
        if key in demo:
            normalised = recipe.to_parameters(recipe.validate({**demo, key: value}))[key]
            assert normalised == demo[key], f"{path}: default of {key} differs from params/cpu-demo.yaml"
        else:
            # The runner passes these two besides the recipe: where the run goes, and that nobody is watching (batch).
            assert key in ("run_dir", "batch"), f"{path}: parameter {key} is not a recipe key"


@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=ALL_IDS)
def test_no_sys_path_editing_or_secrets_in_parameters(path):
    for cell in cells(path):
        assert "sys.path" not in code(cell)
    names = [node.target.id.lower() for node in ast.parse(code(parameters_cell(path)[0])).body]
    secrets = [n for n in names if n == "token" or n.endswith("_token") or any(s in n for s in ("api_key", "secret", "password"))]
    assert not secrets, f"{path}: secrets come from the environment, never from parameters: {secrets}"


def test_recipe_keys_are_yaml_literals_papermill_can_inject():
    demo = yaml.safe_load(Path("params/cpu-demo.yaml").read_text())
    assert set(demo) <= set(recipe.Recipe.model_fields)


@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=ALL_IDS)
def test_papermill_documents_every_parameter(path):
    """`papermill --help-notebook` lists each parameter; a line its parser cannot read is silently missing there."""
    from papermill.translators import PythonTranslator

    source = code(parameters_cell(path)[0])
    assert len(PythonTranslator.inspect({"source": source})) == len([line for line in source.splitlines() if line.strip()])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_import_shadows_a_parameter(path):
    """`recipe.from_namespace(globals())` reads parameters by name, so an import must not reuse one."""
    imported = {alias.asname or alias.name for cell in cells(path) if cell["cell_type"] == "code"
                for node in ast.walk(ast.parse(code(cell))) if isinstance(node, ast.ImportFrom | ast.Import) for alias in node.names}
    assert not imported & set(recipe.Recipe.model_fields), f"{path}: {imported & set(recipe.Recipe.model_fields)}"


@pytest.mark.integration
@pytest.mark.parametrize("stage, present, first", [
    ("03_qlora_train", [], "00_dataset_inspection"),
    ("04_adapter_eval", [], "00_dataset_inspection"),
    ("04_adapter_eval", ["data/report.json"], "03_qlora_train"),
    ("05_gguf_export", ["data/report.json"], "03_qlora_train"),
    ("06_chat_demo", ["data/report.json"], "03_qlora_train"),
])
def test_a_notebook_opened_alone_stops_at_once_naming_the_stage_to_run_first(tmp_path, stage, present, first):
    import papermill

    run_dir = tmp_path / "run"
    for name in present:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    out = tmp_path / "out.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        papermill.execute_notebook(f"notebooks/{stage}.ipynb", str(out), parameters={"run_dir": str(run_dir)},
                                   cwd="notebooks", progress_bar=False, kernel_name="python3")
    assert failure.value.ename == "MedcotError" and f"Run stage {first} first" in failure.value.evalue
    executed = [c for c in cells(out) if c["cell_type"] == "code" and c.get("execution_count")]
    assert "require_inputs" in code(executed[-1])  # it stopped there, before loading any model
