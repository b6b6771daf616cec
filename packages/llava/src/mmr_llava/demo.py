"""``mmr-llava demo``: a Gradio web chat about an image with a checkpoint, as the original's web demo.

One process serves the page and generates (the original splits these into a controller, a web server and
model workers; a single checkpoint needs none of that). A reply goes through the same path as
``mmr-llava chat``: :func:`mmr_llava.inference.stream_answer` on the conversation so far, the image marked by
``<image>\\n`` before the first question, so that greedy settings give the chat command's reply word for word
(the browser test checks it).

Behaviour users of the original demo expect: an uploaded image belongs to the conversation; uploading
another one starts a new conversation (LLaVA-1.5 was trained on one image per conversation); a question
without an image is a text-only chat; "Clear history" forgets both. Temperature, top-p and max new tokens
are set per message in the page; the other generation options come from the command line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from mmr_llava.inference import GenerationOptions, stream_answer

TITLE = "LLaVA (mmr-llava demo)"
# System fonts only: Gradio's default theme loads Google Fonts, which an offline machine cannot reach.
_SANS = ("ui-sans-serif", "system-ui", "sans-serif")
_MONO = ("ui-monospace", "Consolas", "monospace")


@dataclass(frozen=True)
class ChatState:
    """One browser session's conversation.

    Attributes:
        image: Path of the conversation's image (Gradio's copy of the upload), or None for a text-only chat.
        turns: Finished ``(question, reply)`` pairs, oldest first.
    """

    image: str | None = None
    turns: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def conversation(self, question: str) -> list[dict[str, str]]:
        """The turns plus ``question`` as :func:`mmr_llava.inference.answer_batch` takes them.

        The first question carries ``<image>\\n`` when there is an image, as ``mmr-llava chat`` builds it.
        """
        conv: list[dict[str, str]] = []
        for number, (asked, reply) in enumerate([*self.turns, (question, None)]):
            prefix = "<image>\n" if number == 0 and self.image is not None else ""
            conv.append({"from": "human", "value": prefix + asked})
            if reply is not None:
                conv.append({"from": "gpt", "value": reply})
        return conv

    def messages(self, pending: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """The chat as Gradio's chatbot shows it: the image first, then the questions and replies.

        Args:
            pending: A question and the part of its reply generated so far.
        """
        shown: list[dict[str, Any]] = []
        if self.image is not None:
            shown.append({"role": "user", "content": {"path": self.image}})
        for asked, reply in [*self.turns, *([pending] if pending else [])]:
            shown += [{"role": "user", "content": asked}, {"role": "assistant", "content": reply}]
        return shown


def respond(model, tok, template: str, base: GenerationOptions, state: ChatState, question: str,
            image: str | None, temperature: float, top_p: float, max_new_tokens: float
            ) -> Iterator[tuple[ChatState, list[dict[str, Any]], str]]:
    """Answer ``question``, yielding ``(state, chatbot messages, textbox value)`` as the reply grows.

    Args:
        model: The loaded :class:`mmr_llava.model.LlavaModel`.
        tok: Its tokenizer.
        template: Conversation template (``v1`` for LLaVA-1.5).
        base: Generation options from the command line; the page's controls replace three of them.
        state: The session's conversation before this question.
        question: The user's text.
        image: The image box's file, or None.
        temperature: 0 for greedy decoding.
        top_p: Nucleus mass when sampling.
        max_new_tokens: Most new tokens (a slider value, hence possibly a float).
    """
    question = question.strip()
    if image is not None and image != state.image:  # a new picture starts a new conversation
        state = ChatState(image=image)
    if not question:
        yield state, state.messages(), ""
        return
    options = replace(base, temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))
    reply = ""
    yield state, state.messages((question, reply)), ""
    for piece in stream_answer(model, tok, template, state.conversation(question),
                               [state.image] if state.image is not None else [], options=options):
        reply += piece
        yield state, state.messages((question, reply)), ""
    state = replace(state, turns=(*state.turns, (question, reply)))
    yield state, state.messages(), ""


def build_demo(model, tok, template: str = "v1", options: GenerationOptions | None = None):
    """The Gradio page: image box, chat, message box, send and clear buttons, generation controls.

    Args:
        model: The loaded model (see :func:`mmr_llava.inference.load_for_inference`).
        tok: Its tokenizer.
        template: Conversation template.
        options: Command-line generation options; the sliders start at its temperature, top-p and max new
            tokens.

    Returns:
        ``gradio.Blocks``, not yet launched.
    """
    import gradio as gr

    options = options or GenerationOptions(max_new_tokens=512, temperature=0.2)

    def on_send(state, question, image, temperature, top_p, max_new_tokens):
        busy = gr.update(interactive=False)  # Send stays disabled until the reply is complete
        try:
            for shown in respond(model, tok, template, options, state, question, image, temperature, top_p,
                                 max_new_tokens):
                yield *shown, busy
        except ValueError as err:  # e.g. a conversation longer than the model's context: say so in the page
            raise gr.Error(str(err)) from None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nUpload an image, ask about it, and keep asking. A new image starts a new "
                    "conversation.")
        state = gr.State(ChatState())
        with gr.Row():
            with gr.Column(scale=1):
                # filepath and no mode conversion: the uploaded file as it is, read by the same image loader
                # as `mmr-llava chat --image`.
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 label="Image", elem_id="image")
                temperature = gr.Slider(0.0, 2.0, value=options.temperature, step=0.05, label="Temperature",
                                        info="0: greedy", elem_id="temperature")
                top_p = gr.Slider(0.0, 1.0, value=options.top_p, step=0.05, label="Top P", elem_id="top-p")
                max_new_tokens = gr.Slider(1, max(2048, options.max_new_tokens), value=options.max_new_tokens,
                                           step=1, label="Max new tokens", elem_id="max-new-tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="LLaVA", height=480, elem_id="chatbot", feedback_options=None,
                                     buttons=["copy_all"])
                with gr.Row():
                    question = gr.Textbox(show_label=False, placeholder="Ask about the image and press Enter",
                                          scale=4, elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                clear = gr.Button("Clear history", elem_id="clear")
        inputs = [state, question, image, temperature, top_p, max_new_tokens]
        outputs = [state, chatbot, question, send]
        # One model: one generation at a time, whether started by Enter or by the button. Send is enabled
        # again when the reply is complete or generation failed.
        for trigger in (question.submit, send.click):
            trigger(on_send, inputs, outputs, concurrency_limit=1, concurrency_id="generate").then(
                lambda: gr.update(interactive=True), None, send, queue=False)
        clear.click(lambda: (ChatState(), [], "", None), None, [state, chatbot, question, image], queue=False)
        # The chat's own bin icon empties the display: forget the conversation with it (the image stays).
        chatbot.clear(lambda image: ChatState(image=image), [image], [state], queue=False)
    return demo


def launch(model, tok, template: str = "v1", options: GenerationOptions | None = None, host: str = "127.0.0.1",
           port: int = 7860) -> None:
    """Serve :func:`build_demo` on ``http://host:port`` until interrupted (prints the address)."""
    import gradio as gr

    theme = gr.themes.Default(font=_SANS, font_mono=_MONO)
    # quiet: Gradio's own start-up lines suggest share=True (a public tunnel, never wanted for a local model
    # demo); our one line says where the demo is.
    app = build_demo(model, tok, template, options).queue()
    app.launch(server_name=host, server_port=port, theme=theme, share=False, show_error=True, quiet=True,
               prevent_thread_lock=True)
    print(f"LLaVA demo on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


def require_gradio() -> None:
    """Import Gradio now, before a model is loaded, with the fix in the message when it is missing.

    Raises:
        SystemExit: Gradio is not installed.
    """
    # No usage reports to Gradio's servers from a local demo (the user can still set the variable).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("mmr-llava demo needs Gradio: pip install 'mmr-llava[demo]' (in this repository "
                         "bash scripts/setup_env.sh installs it)") from None
