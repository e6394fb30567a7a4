"""Stage 06: chat with the trained model in a browser, the base model beside it.

The same question goes to both models, rendered by `prompts.render` exactly as training and evaluation render an
item, and both are decoded the same way, one token of each in turn, so the two panes stream together. Each
question is answered on its own: earlier turns stay on the page but are never sent, because the models were
trained on single turns. The `<think>` reasoning is shown in a collapsible block apart from the final answer.

Backends follow stage 04's `eval_backend` rule: `llamacpp` runs the base and fine-tuned F16 GGUFs (fast on a CPU),
`hf` runs the base with the stage-03 adapter switched off and on (exact, no merge). Decoding is the evaluation's:
greedy argmax, or temperature + top-p seeded by the recipe's seed (`llamacpp.pick_token` for both backends).

Privacy: the app binds 127.0.0.1, a public share link is opt-in, gradio's analytics, version check and run history
are off, and nothing typed is written to disk unless a log file is given.

One module per job: `reasoning` (the think block apart from the answer, while streaming), `backends` (the two models
streaming tokens, and which backend a run can use), `engine` (both models, their shared template and decoding), `app`
(the gradio page, serving it and checking it answers). Everything is re-exported here: `from medcot_lib import chat`.
"""

import os

# gradio reads this on import and on launch: no usage analytics and no version-check request. gradio itself is imported
# only inside the functions that build and serve the app, after this line has run.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from .app import (  # noqa: E402
    DEFAULT_HOST,
    DEFAULT_PORT,
    EMPTY_PROMPT,
    Served,
    build_app,
    check_app,
    check_table,
    free_port,
    launch,
    metrics,
    panes,
    respond,
    serve,
)
from .backends import CONTEXT_CAP, GGUFStreamer, HFStreamer, choose_backend, context_window, tuned_gguf  # noqa: E402
from .engine import LABELS, Chat, Output, examples, open_chat, run_recipe  # noqa: E402
from .reasoning import CLOSED, NO_BLOCK, OPEN, TITLES, UNCLOSED, Parts, split_reasoning, turn_messages  # noqa: E402

__all__ = [
    "CLOSED", "CONTEXT_CAP", "DEFAULT_HOST", "DEFAULT_PORT", "EMPTY_PROMPT", "LABELS", "NO_BLOCK", "OPEN", "TITLES",
    "UNCLOSED", "Chat", "GGUFStreamer", "HFStreamer", "Output", "Parts", "Served", "build_app", "check_app",
    "check_table", "choose_backend", "context_window", "examples", "free_port", "launch", "metrics", "open_chat", "panes",
    "respond", "run_recipe", "serve", "split_reasoning", "tuned_gguf", "turn_messages",
]
