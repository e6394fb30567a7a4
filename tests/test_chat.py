"""Stage 06, the chat app: reasoning split while streaming, bad input, and the app itself in a real browser.

The unit tests drive the app's logic with scripted models. The integration tests start the app on the shared demo run
(`finished_run` in conftest.py; MEDCOT_CHAT_RUN=/path/to/a/finished/run reuses an existing one), call it through
gradio_client, and open it in Debian's headless Chromium through selenium. MEDCOT_UPDATE_SCREENSHOT=1 also copies the
browser's screenshot to docs/images/chat.png, the README's.
"""

import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest

import medcot_lib
from medcot_lib import answers, chat, cli, pipeline, prompts, recipe
from medcot_lib.data import Record
from medcot_lib.errors import MedcotError

REASONED = ("<think>\nOkay, macrocytic anemia with hypersegmented neutrophils: B12 or folate deficiency. Check both "
            "levels, then methylmalonic acid.\n</think>\n\nThe answer is vitamin B12 deficiency.")
PLAIN = "It is probably anemia, said plainly without any reasoning block."


class Scripted:
    """A model that streams a fixed text, token by token, and remembers being asked."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.prompts = []

    def stream(self, ids, max_new_tokens, sampling):
        self.prompts.append(ids)
        yield from self.ids[:max_new_tokens]

    def close(self):
        pass


def scripted_chat(tokenizer, *, context=4096, log_path=None, texts=(PLAIN, REASONED)):
    streamers = {label: Scripted(tokenizer, text) for label, text in zip(chat.LABELS, texts, strict=True)}
    style = prompts.PromptStyle("think", prompts.THINK_SYSTEM_PROMPT, {})
    return chat.Chat(tokenizer, style, streamers, context, 42, {"run": "scripted", "backend": "scripted"}, log_path)


# --------------------------------------------------------------------------- reasoning and answer


@pytest.mark.parametrize("text, finished, expected", [
    ("", False, chat.Parts(None, "", chat.NO_BLOCK)),
    ("<thi", False, chat.Parts(None, "", chat.NO_BLOCK)),  # a tag still arriving is held back
    ("<think>\nOkay, B12", False, chat.Parts("Okay, B12", "", chat.OPEN)),
    ("<think>\nOkay, B12\n</thi", False, chat.Parts("Okay, B12", "", chat.OPEN)),
    ("<think>\nOkay, B12\n</think>\n\nThe answer", False, chat.Parts("Okay, B12", "The answer", chat.CLOSED)),
    ("<think>\nOkay, B12 and", True, chat.Parts("Okay, B12 and", "", chat.UNCLOSED)),  # the budget ran out inside it
    ("Plain answer.", True, chat.Parts(None, "Plain answer.", chat.NO_BLOCK)),
    ("<thi", True, chat.Parts(None, "<thi", chat.NO_BLOCK)),  # finished: shown as written
])
def test_split_reasoning_while_streaming_and_when_finished(text, finished, expected):
    assert chat.split_reasoning(text, finished=finished) == expected


def test_a_prefilled_think_block_is_reasoning_from_the_first_token():
    assert chat.split_reasoning("Okay.\n</think>\n\nYes.", prefilled=True) == chat.Parts("Okay.", "Yes.", chat.CLOSED)


def test_streamed_prefixes_never_show_a_tag_and_end_as_the_evaluation_splits(tokenizer):
    ids = tokenizer(REASONED, add_special_tokens=False)["input_ids"]
    states = []
    for n in range(1, len(ids) + 1):
        parts = chat.split_reasoning(tokenizer.decode(ids[:n]), finished=n == len(ids))
        assert "<" not in (parts.reasoning or "") + parts.answer
        states.append(parts.state)
    assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == [chat.NO_BLOCK, chat.OPEN, chat.CLOSED]
    final = chat.split_reasoning(REASONED, finished=True)
    assert (final.reasoning, final.answer) == answers.split_think(REASONED)


def test_the_reasoning_is_a_collapsible_message_pending_while_open():
    streaming = chat.turn_messages("Q", "<think>\nOkay", prefilled=False, finished=False)
    assert streaming[1]["metadata"] == {"title": chat.TITLES[chat.OPEN], "status": "pending"} and len(streaming) == 2
    done = chat.turn_messages("Q", REASONED, prefilled=False, finished=True)
    assert done[1]["metadata"]["status"] == "done" and done[2] == {"role": "assistant", "content": "The answer is vitamin B12 deficiency."}
    unclosed = chat.turn_messages("Q", "<think>\nOkay, and", prefilled=False, finished=True)
    assert unclosed[1]["metadata"]["title"].startswith("Reasoning (unclosed") and "No final answer" in unclosed[2]["content"]
    assert [m["role"] for m in chat.turn_messages("Q", PLAIN, prefilled=False, finished=True)] == ["user", "assistant"]


# --------------------------------------------------------------------------- the app's answer, and bad input


def test_both_panes_stream_from_one_prompt_rendered_as_training_renders_it(tokenizer):
    engine = scripted_chat(tokenizer)
    updates = list(chat.respond(engine, "  Why macrocytosis?  ", [], 0.0, 1.0, 256))
    assert len(updates) > 10
    first, last = updates[0], updates[-1]
    assert first[0][1]["content"] and first[1] == [{"role": "user", "content": "Why macrocytosis?"}]  # '<' held back
    base, tuned, notice, turns = last
    assert base[-1]["content"] == PLAIN and tuned[1]["metadata"]["title"] == "Reasoning" and notice.startswith("Done in")
    assert "ended by the model" in notice and turns[0]["finished"] == {"base": True, "fine-tuned": True}
    expected = tokenizer(engine.rendered("Why macrocytosis?"), add_special_tokens=False)["input_ids"]
    assert all(model.prompts == [expected] for model in engine.models.values())
    assert engine.rendered("Why macrocytosis?") == prompts.render(
        Record(id="chat", source="chat", question="Why macrocytosis?", answer=""), tokenizer, engine.style,
        with_target=False).prompt


def test_each_question_is_answered_on_its_own_and_the_conversation_is_kept(tokenizer):
    engine = scripted_chat(tokenizer)
    *_, (_, _, _, turns) = chat.respond(engine, "First?", [], 0.0, 1.0, 64)
    *_, (base, _, _, turns) = chat.respond(engine, "Second?", turns, 0.0, 1.0, 64)
    assert [t["question"] for t in turns] == ["First?", "Second?"] and [m["content"] for m in base if m["role"] == "user"] == ["First?", "Second?"]
    first, second = engine.models["base"].prompts
    assert "First?" in tokenizer.decode(first) and "First?" not in tokenizer.decode(second) and "Second?" in tokenizer.decode(second)


@pytest.mark.parametrize("question", ["", "   \n "])
def test_an_empty_prompt_gets_a_message_not_a_generation(tokenizer, question):
    engine = scripted_chat(tokenizer)
    (update,) = chat.respond(engine, question, [], 0.0, 1.0, 64)
    assert update == ([], [], chat.EMPTY_PROMPT, [])
    assert all(not model.prompts for model in engine.models.values())


def test_a_prompt_longer_than_the_context_is_cut_with_a_visible_notice(tokenizer):
    engine = scripted_chat(tokenizer, context=256)
    question = " ".join(f"finding{i}" for i in range(400))
    sent, ids, notice = engine.prompt(question, 64)
    assert len(ids) <= 256 - 64 and question.startswith(sent) and len(sent) < len(question) / 2
    assert ids == tokenizer(engine.rendered(sent), add_special_tokens=False)["input_ids"]  # the template is intact
    assert notice.startswith("**Question cut:**") and "256-token context" in notice
    *_, (_, tuned, shown, _) = chat.respond(engine, question, [], 0.0, 1.0, 64)
    assert shown.startswith("**Question cut:**") and tuned[0]["content"] == sent
    assert engine.prompt("Short?", 64)[2] is None
    with pytest.raises(MedcotError, match="leaves no room for a question"):
        engine.prompt(question, 250)


def test_nothing_typed_is_written_unless_logging_is_on(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    list(chat.respond(scripted_chat(tokenizer), "Secret symptom?", [], 0.0, 1.0, 32))
    assert not list(tmp_path.rglob("*"))
    log = tmp_path / "logs" / "chat.jsonl"
    list(chat.respond(scripted_chat(tokenizer, log_path=log), "Logged symptom?", [], 0.0, 1.0, 32))
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["question"] == "Logged symptom?" and row["fine-tuned"] and row["decoding"]["max_new_tokens"] == 32


def test_a_port_in_use_moves_to_the_next_free_one_or_fails_clearly():
    with socket.socket() as taken:
        taken.bind((chat.DEFAULT_HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert chat.free_port(chat.DEFAULT_HOST, port) > port
        with pytest.raises(MedcotError, match=f"ports {port} to {port} on 127.0.0.1 are all in use; choose another with --port"):
            chat.free_port(chat.DEFAULT_HOST, port, tries=1)


def _fake_run(tmp_path, files=()):
    run_dir = tmp_path / "run"
    cfg = recipe.load("params/cpu-demo.yaml")
    run_dir.mkdir()
    for name in files:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    (run_dir / pipeline.MANIFEST).write_text(json.dumps({"status": "finished", "params_hash": "x", "stages": {},
                                                         "manifest_schema": pipeline.MANIFEST_SCHEMA,
                                                         "versions": {"medcot": medcot_lib.__version__},
                                                         "parameters": recipe.to_parameters(cfg)}))
    return run_dir, cfg


def test_a_run_without_adapter_or_gguf_names_the_stage_to_run(tmp_path, capsys):
    run_dir, cfg = _fake_run(tmp_path)
    assert chat.run_recipe(run_dir) == cfg
    for backend in ("auto", "hf", "llamacpp"):
        with pytest.raises(MedcotError, match="Run stage 03_qlora_train first: `medcot run RECIPE --run-dir .* --stages 03`"):
            chat.choose_backend(cfg, run_dir, backend)
    assert cli.main(["chat", str(run_dir)]) == 2
    assert "Run stage 03_qlora_train first" in capsys.readouterr().err
    assert cli.main(["chat", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json, so this is not a medcot run directory" in capsys.readouterr().err


def test_llamacpp_without_a_fine_tuned_gguf_names_stage_05_and_auto_falls_back_to_hf(tmp_path):
    run_dir, cfg = _fake_run(tmp_path, ["adapter/adapter_model.safetensors"])
    with pytest.raises(MedcotError, match="Run stage 05_gguf_export first.*or chat through transformers with --backend hf"):
        chat.choose_backend(cfg, run_dir, "llamacpp")
    assert chat.choose_backend(cfg, run_dir, "auto") == "hf" and chat.choose_backend(cfg, run_dir, "hf") == "hf"
    with pytest.raises(MedcotError, match="vllm serves stage 04's batches only"):
        chat.choose_backend(cfg, run_dir, "vllm")
    (run_dir / "export" / "gguf").mkdir(parents=True)
    (run_dir / "export" / "gguf" / "cpu-demo-F16.gguf").write_bytes(b"")
    assert chat.choose_backend(cfg, run_dir, "auto") == "llamacpp"  # this machine: CPU, llama-cpp-python installed


def test_batch_runs_skip_stage_06_unless_the_recipe_asks():
    assert pipeline.OPTIONAL_STAGES["06_chat_demo"] == "chat_demo"
    assert recipe.Recipe.model_fields["chat_demo"].default is False
    assert all(not recipe.load(p).chat_demo for p in Path("params").glob("*.yaml"))  # make demo never waits on a server


# --------------------------------------------------------------------------- the app on the demo run


@pytest.fixture(scope="module")
def demo_run(request):
    """A finished demo run: MEDCOT_CHAT_RUN when set (local iteration), else the session's shared one."""
    if os.environ.get("MEDCOT_CHAT_RUN"):
        return Path(os.environ["MEDCOT_CHAT_RUN"])
    return request.getfixturevalue("finished_run")[0]


@pytest.fixture(scope="module")
def served(demo_run):
    """The app on the demo run, started on a port someone else holds: it must move to the next free one."""
    cfg = chat.run_recipe(demo_run)
    engine = chat.open_chat(cfg, demo_run)
    app = chat.build_app(engine, chat.examples(cfg, demo_run))
    with socket.socket() as taken:
        taken.bind((chat.DEFAULT_HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = chat.launch(app, port=port)
    assert running.port > port and running.notice == f"port {port} is in use; serving on port {running.port} instead"
    assert running.url.startswith("http://127.0.0.1:") and running.share_url is None
    yield running, engine
    running.close()
    engine.close()


@pytest.mark.integration
def test_stage_06_in_a_batch_run_checks_the_app_and_closes_it(demo_run, tmp_path):
    """The notebook as `medcot run` executes it when a recipe sets chat_demo (the demo recipe leaves it off)."""
    import papermill

    params = {**recipe.to_parameters(recipe.load("params/cpu-demo.yaml")), "chat_demo": True}
    out = tmp_path / "06_chat_demo.ipynb"
    papermill.execute_notebook("notebooks/06_chat_demo.ipynb", str(out), cwd="notebooks", progress_bar=False,
                               parameters={**params, "run_dir": str(demo_run.resolve()), "batch": True})
    record = json.loads((demo_run / "metrics" / "06_chat_demo.json").read_text())
    assert record["backend"] == "llamacpp" and record["check"]["streamed"]
    assert set(record["check"]["models"]) == set(chat.LABELS)
    executed = json.loads(out.read_text())
    assert any("streamed updates in" in "".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))


@pytest.mark.integration
def test_the_api_streams_both_panes_with_reasoning_apart_from_the_answer(served):
    running, engine = served
    assert engine.info["backend"] == "llamacpp" and engine.info["run"] == "cpu-demo"
    check = chat.check_app(running.url, max_new_tokens=288)
    assert check["updates"] > 20 and check["notice"].startswith("Done in")
    table = chat.check_table(check).set_index("model")
    assert table.loc["fine-tuned", "reasoning"] and table.loc["fine-tuned", "answer"]  # the trained format
    assert "<think>" not in table.loc["fine-tuned", "answer"] and "</think>" not in table.loc["fine-tuned", "reasoning"]
    assert table.loc["base", "answer"]


# --------------------------------------------------------------------------- in a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1150"]


def _skip_loudly(reason: str):
    """Skip, and say so where a CI log shows it: a skipped browser test must never be silent."""
    message = f"test_chat browser test SKIPPED: {reason}"
    print(message, file=sys.stderr)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path):
    """A factory of headless Debian Chromium sessions (selenium), each with a fresh profile; all closed afterwards."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(chromium).is_file() and Path(driver_path).is_file()):
        _skip_loudly("Debian's chromium and chromium-driver are not installed (`apt-get install -y chromium "
                     "chromium-driver`; .ci/run installs them when it runs as root or with sudo)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def start():
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}"]:
            options.add_argument(flag)
        drivers.append(webdriver.Chrome(service=Service(driver_path), options=options))  # explicit paths: no Selenium Manager
        return drivers[-1]

    yield start
    for driver in drivers:
        driver.quit()


def _pane(driver, label):
    """A pane's state: its text, whether a reasoning block is open (streaming) or closed, and its answer messages."""
    return driver.execute_script("""
        const pane = document.querySelector(arguments[0]);
        const title = pane.querySelector('.thought-group .title');
        return {text: pane.innerText, thought: title ? (title.classList.contains('expanded') ? 'open' : 'closed') : null,
                titleText: title ? title.innerText : null,
                answers: [...pane.querySelectorAll('[data-testid=bot]')].filter(e => !e.querySelector('.thought-group')).map(e => e.innerText)};
    """, "#pane-base" if label == "base" else "#pane-tuned")


def _ask(driver, url, question):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    box = WebDriverWait(driver, 60).until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#question textarea")))
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#ask").click()


def _watch_until_done(driver, timeout=240):
    """Poll both panes while they stream; every distinct state seen, until the notice says done."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = {label: _pane(driver, label) for label in chat.LABELS}
        state["notice"] = driver.execute_script("return document.querySelector('#notice').innerText")
        if not seen or state != seen[-1]:
            seen.append(state)
        if state["notice"].startswith("Done in"):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no answer within {timeout} s; last state: {seen[-1] if seen else None}")


@pytest.mark.integration
def test_a_browser_sees_both_panes_stream_and_the_reasoning_open_then_close(served, browser, tmp_path):
    running, _ = served
    first, second = browser(), browser()
    question = prompts.SHOWCASE_QUESTIONS["showcase-macrocytic-anemia"]
    other = prompts.SHOWCASE_QUESTIONS["showcase-inferior-stemi"]
    _ask(first, running.url, question)
    _ask(second, running.url, other)  # a second session at once: queued, then served, with its own conversation
    seen = _watch_until_done(first)
    base_lengths = {len(s["base"]["text"]) for s in seen}
    tuned_lengths = {len(s["fine-tuned"]["text"]) for s in seen}
    assert len(base_lengths) > 5 and len(tuned_lengths) > 5, "both panes grow while the models stream"
    thoughts = [s["fine-tuned"]["thought"] for s in seen if s["fine-tuned"]["thought"]]
    assert thoughts[0] == "open" and thoughts[-1] == "closed", thoughts  # the block appears open, then closes
    final = seen[-1]["fine-tuned"]
    assert final["titleText"].strip() == "Reasoning" and final["answers"] and "</think>" not in final["text"]
    assert question.split(".")[0] in seen[-1]["base"]["text"] and other.split(".")[0] not in seen[-1]["base"]["text"]

    resources = first.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(running.url) for r in resources), "the page loads nothing from elsewhere"
    shot = tmp_path / "chat.png"
    assert first.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MEDCOT_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, Path(__file__).resolve().parent.parent / "docs" / "images" / "chat.png")

    from selenium.webdriver.common.by import By

    first.find_element(By.CSS_SELECTOR, "#pane-tuned .thought-group .title").click()  # collapsible: open it again
    assert _pane(first, "fine-tuned")["thought"] == "open"

    later = _watch_until_done(second)[-1]
    assert other.split(".")[0] in later["base"]["text"] and question.split(".")[0] not in later["base"]["text"]
    assert question.split(".")[0] not in later["fine-tuned"]["text"]


def test_the_hf_backend_streams_exactly_what_batched_generation_writes(tokenizer):
    """Base + adapter (a fresh LoRA, so both sides equal the base): the streamed greedy tokens are generate()'s."""
    from peft import LoraConfig, get_peft_model

    from medcot_lib import generate, models

    cfg = recipe.load("params/cpu-demo.yaml")
    model = get_peft_model(models.load_model(cfg), LoraConfig(r=4, target_modules=["q_proj"])).eval()
    style, record = prompts.PromptStyle.from_recipe(cfg), prompts.SHOWCASE[0]
    (expected,) = generate.generate(model, tokenizer, [record], style, generate.Decoding(16, False, 0.6, 0.95, 1, 42),
                                    progress=False)
    ids = tokenizer(expected.prompt, add_special_tokens=False)["input_ids"]
    stop = generate.stop_ids(tokenizer, model.generation_config)
    for adapter in (True, False):
        streamed = list(chat.HFStreamer(model, adapter=adapter, stop=stop).stream(ids, 16, None))
        assert tokenizer.decode(streamed, skip_special_tokens=True) == expected.output
