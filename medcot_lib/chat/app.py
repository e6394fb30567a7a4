"""The gradio app: the two panes side by side, the question box, decoding controls and examples; serving it, and
checking that it answers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import DISCLAIMER, prompts
from ..errors import MedcotError
from .engine import LABELS, Chat, Output, examples, open_chat, run_recipe
from .reasoning import turn_messages

DEFAULT_HOST = "127.0.0.1"  # this machine only; share=True is the opt-in for a public link
DEFAULT_PORT = 7860  # gradio's usual port; the next free one is taken when it is in use
PORT_TRIES = 100
EMPTY_PROMPT = "**Type a question first:** nothing was generated."


def panes(turns: list[dict], prefilled: bool) -> tuple[list[dict], list[dict]]:
    """The base and fine-tuned panes' messages for a conversation's turns."""
    return tuple([m for turn in turns for m in turn_messages(turn["question"], turn[label], prefilled=prefilled,
                                                             finished=turn["finished"][label])]
                 for label in LABELS)


def _progress(outputs: dict[str, Output], max_new_tokens: int, seconds: float) -> str:
    def state(o: Output) -> str:
        if not o.finished:
            return f"{o.new_tokens} tokens…"
        return f"{o.new_tokens} tokens ({'max new tokens reached' if o.new_tokens >= max_new_tokens else 'ended by the model'})"

    done = all(o.finished for o in outputs.values())
    return (f"{'Done' if done else 'Generating'} in {seconds:.1f} s: "
            + "; ".join(f"{label} {state(o)}" for label, o in outputs.items()))


def respond(chat: Chat, question: str, turns: list[dict] | None, temperature: float, top_p: float,
            max_new_tokens: float) -> Iterator[tuple]:
    """The app's answer to one question, as it streams: (base pane, fine-tuned pane, notice, turns)."""
    turns = list(turns or [])
    question = (question or "").strip()
    if not question:
        yield *panes(turns, chat.prefilled), EMPTY_PROMPT, turns
        return
    max_new_tokens = int(max_new_tokens)
    sent, ids, cut = chat.prompt(question, max_new_tokens)
    turn = {"question": sent, **dict.fromkeys(LABELS, ""), "finished": dict.fromkeys(LABELS, False)}
    turns.append(turn)
    started, outputs = time.monotonic(), {}
    for outputs in chat.stream(ids, temperature=float(temperature), top_p=float(top_p), max_new_tokens=max_new_tokens):
        for label, output in outputs.items():
            turn[label], turn["finished"][label] = output.text, output.finished
        notice = "\n\n".join(filter(None, [cut, _progress(outputs, max_new_tokens, time.monotonic() - started)]))
        yield *panes(turns, chat.prefilled), notice, turns
    chat.log(sent, outputs, {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": max_new_tokens})


def header(chat: Chat) -> str:
    """The page's heading: run, medcot version, models and backend, then the medical disclaimer."""
    info = chat.info
    facts = " · ".join(f"{key} **{info[key]}**" for key in ("run", "medcot", "base model", "backend") if key in info)
    return (f"# medcot · chat with `{info['run']}`\n\n{facts}\n\n> **Medical disclaimer.** {DISCLAIMER}\n\n"
            f"The same question goes to both models, in the training template and with the same decoding. Each question "
            f"is answered on its own: earlier turns stay on the page but are not sent.")


def details(chat: Chat) -> str:
    """Everything the page knows about the models, as a table (weights files, packages)."""
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in chat.info.items())


def build_app(chat: Chat, example_questions: list[str] | None = None):
    """The gradio app: the two panes side by side, the question box, decoding controls and the examples."""
    import gradio as gr

    with gr.Blocks(title=f"medcot chat · {chat.info['run']}", analytics_enabled=False) as app:
        gr.Markdown(header(chat), elem_id="header")
        with gr.Accordion("Models, weights and versions", open=False):
            gr.Markdown(details(chat), elem_id="details")
        with gr.Row():
            base = gr.Chatbot(label="Base model", elem_id="pane-base", height=460, feedback_options=None, buttons=["copy"])
            tuned = gr.Chatbot(label="Fine-tuned", elem_id="pane-tuned", height=460, feedback_options=None, buttons=["copy"])
        notice = gr.Markdown(elem_id="notice")
        with gr.Row():
            question = gr.Textbox(label="Question", placeholder="Ask a medical question (educational use only)", lines=3,
                                  scale=5, elem_id="question")
            with gr.Column(scale=1, min_width=120):
                ask = gr.Button("Ask both", variant="primary", elem_id="ask")
                clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Decoding (the same for both models)", open=False):
            temperature = gr.Slider(0, 1.5, value=chat.defaults.get("temperature", 0.0), step=0.05,
                                    label="temperature (0: greedy, reproducible)", elem_id="temperature")
            top_p = gr.Slider(0.05, 1, value=chat.defaults.get("top_p", 1.0), step=0.05, label="top-p (when sampling)",
                              elem_id="top-p")
            max_new = gr.Slider(16, chat.context // 2, value=min(chat.defaults.get("max_new_tokens", 256), chat.context // 2),
                                step=16, label="max new tokens", elem_id="max-new-tokens")
        if example_questions:
            gr.Examples([[q] for q in example_questions], inputs=[question], label="Examples: showcase questions and eval items",
                        examples_per_page=len(example_questions), cache_examples=False)
        turns = gr.State([])

        def answer(text, history, t, p, n):
            yield from respond(chat, text, history, t, p, n)

        inputs, outputs = [question, turns, temperature, top_p, max_new], [base, tuned, notice, turns]
        ask.click(answer, inputs, outputs, api_name="ask")
        question.submit(answer, inputs, outputs, api_name=False)
        clear.click(lambda: ([], [], "", []), None, outputs, api_name=False)
    return app


def free_port(host: str, port: int, tries: int = PORT_TRIES) -> int:
    """The first port from `port` on that nothing listens on."""
    for candidate in range(port, port + tries):
        with socket.socket() as probe:
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise MedcotError(f"ports {port} to {port + tries - 1} on {host} are all in use; choose another with --port")


@dataclass
class Served:
    app: Any
    url: str
    port: int
    share_url: str | None
    notice: str | None  # set when the requested port was taken

    def close(self) -> None:
        self.app.close()


def launch(app, *, port: int = DEFAULT_PORT, share: bool = False, host: str = DEFAULT_HOST,
           inline: bool | None = None) -> Served:
    """Serve the app without blocking (in a notebook it shows inline, Colab included); a taken port moves to the next free one."""
    app.queue(default_concurrency_limit=1)  # one generation at a time: a second browser session waits in the queue
    wanted = port
    for _ in range(3):  # another process may take the probed port before gradio binds it
        chosen = free_port(host, port)
        try:
            _, url, share_url = app.launch(server_name=host, server_port=chosen, share=share, inline=inline,
                                           prevent_thread_lock=True, quiet=True, show_error=True, run_history=False,
                                           footer_links=["api"], mcp_server=False, ssr_mode=False, enable_monitoring=False)
            break
        except OSError:
            port = chosen + 1
    else:
        raise MedcotError(f"cannot serve on {host} from port {wanted} on: each free port was taken before it could be bound; "
                          "choose another with --port")
    notice = None if chosen == wanted else f"port {wanted} is in use; serving on port {chosen} instead"
    print("\n".join(filter(None, [notice, f"medcot chat: serving on {url}" + (f" and publicly on {share_url}" if share_url
                                                                                 else " (this machine only)")])))
    return Served(app, url, chosen, share_url, notice)


def check_app(url: str, question: str | None = None, *, max_new_tokens: int = 48) -> dict:
    """Ask the running app one question through its API, as a browser does; what streamed back, and the last state."""
    from gradio_client import Client

    question = question or next(iter(prompts.SHOWCASE_QUESTIONS.values()))
    started = time.monotonic()
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    job = client.submit(question, 0.0, 1.0, max_new_tokens, api_name="/ask")
    updates = list(job)
    if not updates:
        raise MedcotError(f"{url}: the chat app sent nothing back for a question")
    base, tuned, notice = updates[-1][:3]
    return {"url": url, "question": question, "updates": len(updates), "seconds": round(time.monotonic() - started, 1),
            "notice": notice, "base": base, "fine-tuned": tuned}


def check_table(check: dict):
    """The check's final panes as a table: each model's reasoning (when it wrote a block) and answer."""
    import pandas as pd

    def part(messages: list[dict], reasoning: bool) -> str:
        texts = [_text(m) for m in messages if m["role"] == "assistant" and bool(m.get("metadata")) == reasoning]
        return "\n".join(texts)

    return pd.DataFrame([{"model": label, "reasoning": part(check[label], True), "answer": part(check[label], False)}
                         for label in LABELS])


def metrics(chat: Chat, check: dict) -> dict:
    """What stage 06 records: backend, weight files, context, and the check's question, each model's reasoning and answer,
    whether the answer streamed, and how long it took (the rest is identical in a rerun)."""
    return {"backend": chat.info["backend"], "context_tokens": chat.context,
            "files": {k.removesuffix(" weights"): v for k, v in chat.info.items() if k.endswith(" weights")},
            "check": {"question": check["question"], "streamed": check["updates"] > 1, "seconds": check["seconds"],
                      "models": check_table(check).set_index("model").to_dict(orient="index")}}


def _text(message: dict) -> str:
    """A chat message's text, whether its content is a string or gradio's list of typed parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if isinstance(item, dict))


def serve(run_dir: str | Path, *, backend: str | None = None, port: int = DEFAULT_PORT, share: bool = False,
          log_path: str | Path | None = None) -> None:
    """`medcot chat RUN_DIR`: load the run's models, serve the app, and block until Ctrl-C."""
    cfg = run_recipe(run_dir)
    chat = open_chat(cfg, run_dir, backend=backend, log_path=log_path)
    served = launch(build_app(chat, examples(cfg, run_dir)), port=port, share=share, inline=False)
    try:
        print("Ctrl-C stops it.")
        served.app.block_thread()  # returns on Ctrl-C, after closing the server
    finally:
        chat.close()
