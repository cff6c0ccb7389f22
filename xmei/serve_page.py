"""The page and the API of `xmei serve` (Gradio): xmei.serve's Service in a browser.

Process model: Gradio's server (uvicorn, in a thread of the `xmei serve` process) takes the
requests; its queue runs the events of the device (a transcript, an answer) one at a time, in
the concurrency group "device", and a request waiting shows its place in the queue. Nothing is
fetched from outside: Gradio serves its own scripts and fonts, and analytics are off.

The page: a video (upload or webcam), its subtitle (filled by a sidecar or speech recognition
when the clip is uploaded, editable), optional video / audio descriptions; one column per
checkpoint with emotion and intent (a probability bar per label, or the label alone where the
answer has no probabilities), the explanation streamed as it is generated, the frames under the
visual LQ-Former's attention, the waveform with its windows coloured by the audio LQ-Former's,
notes, and the answer as a JSON file. A request the service refuses (ServeError, or any other
UserError) is a message on the page and one log line; the server keeps serving.

The API (`gradio_client`): ``/predict`` (video file, subtitle, video description, audio
description) returns every checkpoint's answer as JSON (xmei.serve.Answered.to_json); a refused
request raises the client's AppError with the same message.
"""
from __future__ import annotations

import base64
import io
import logging
import os
from html import escape
from pathlib import Path
from typing import Any

from xmei.errors import UserError
from xmei.serve import KEEP_ANSWERS_S, Answered, Partial, ServeError, Service

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing leaves the machine
import gradio as gr  # noqa: E402

__all__ = ["build_page", "serve"]

log = logging.getLogger("xmei.serve")
DEVICE = "device"  # the concurrency group of everything that runs a model
INTRO = ("**xmei**: the speaker's emotion and intent, and why they go together, from a clip and its subtitle. "
         "Upload a video (or record one), check its subtitle, and ask.")
CSS = """
.xmei-labels {margin-bottom: 0.8em}
.xmei-kind {font-size: 0.85em; color: var(--body-text-color-subdued)}
.xmei-label {font-size: 1.6em; font-weight: 600}
.xmei-bar {display: grid; grid-template-columns: 8.5em 1fr 3em; gap: 0.4em; font-size: 0.9em; align-items: center}
.xmei-bar.xmei-answer {font-weight: 600}
.xmei-track {background: var(--neutral-200); height: 0.6em; border-radius: 0.3em; overflow: hidden}
.xmei-track span {display: block; height: 100%; background: var(--color-accent)}
.xmei-frames img, .xmei-audio img {width: 100%; height: auto; image-rendering: pixelated}
figure {margin: 0.5em 0} figcaption {font-size: 0.8em; color: var(--body-text-color-subdued)}
.xmei-notes {font-size: 0.9em; color: var(--body-text-color-subdued)}
"""


class _Column:
    """One checkpoint's outputs on the page."""

    def __init__(self, index: int, name: str, modalities: tuple[str, ...]):
        gr.Markdown(f"### {name}\n{' + '.join(modalities + ('subtitle',))}")
        self.labels = gr.HTML(elem_id=f"labels-{index}")
        self.explanation = gr.Textbox(label="explanation", lines=4, interactive=False, elem_id=f"explanation-{index}")
        self.evidence = gr.HTML(elem_id=f"evidence-{index}")
        self.json = gr.File(label="the whole answer (JSON)", interactive=False, elem_id=f"json-{index}")

    @property
    def outputs(self) -> list:
        return [self.labels, self.explanation, self.evidence, self.json]


def build_page(service: Service) -> gr.Blocks:
    """The page of ``service`` (module docstring), with its ``/predict`` API endpoint."""
    with gr.Blocks(title="xmei serve", analytics_enabled=False,
                   delete_cache=(KEEP_ANSWERS_S, KEEP_ANSWERS_S)) as page:  # uploads and copies of answers
        gr.Markdown(INTRO + f" Clips up to {service.max_seconds:g} s.")
        with gr.Row():
            video = gr.Video(label="clip", sources=["upload", "webcam"], include_audio=True, height=300,
                             elem_id="clip")
            with gr.Column():
                subtitle = gr.Textbox(label="subtitle (from a sidecar file or speech recognition when one can be "
                                            "made; edit it)", lines=2, elem_id="subtitle")
                source = gr.State("given")
                with gr.Accordion("descriptions (optional)", open=False):
                    video_description = gr.Textbox(label="video description", lines=1)
                    audio_description = gr.Textbox(label="audio description", lines=1)
                ask = gr.Button("Answer", variant="primary", elem_id="ask")
                status = gr.HTML(elem_id="status")  # what the page is doing, or why it cannot
        columns = []
        with gr.Row(equal_height=False):
            for index, model in enumerate(service.models):
                with gr.Column(min_width=280):
                    columns.append(_Column(index, model.name, model.modalities))
        outputs = [status] + [o for c in columns for o in c.outputs]

        def fill_subtitle(clip: str | None):
            """(subtitle, its source, status) of a new clip."""
            if not clip:
                return "", "given", ""
            try:
                text, found = service.transcript(clip)
            except UserError as err:
                log.info("upload %s: %s", Path(clip).name, err)
                return "", "given", _said(str(err), bold=True)
            said = {"none": "no sidecar file and no speech recognized: type the subtitle, or answer without one",
                    "asr": "subtitle from speech recognition: check it"}.get(found, f"subtitle from the {found} file")
            return text, found, _said(said)

        def answer_page(clip, text, found, described_video, described_audio):
            yield from _page_updates(service, columns, clip, text, found, described_video, described_audio)

        video.change(fill_subtitle, video, [subtitle, source, status], concurrency_id=DEVICE,
                     show_progress_on=subtitle, api_visibility="private")
        subtitle.input(lambda: "given", None, source, queue=False, api_visibility="private")
        ask.click(answer_page, [video, subtitle, source, video_description, audio_description], outputs,
                  concurrency_id=DEVICE, show_progress_on=[c.explanation for c in columns], api_visibility="private")

        api_video = gr.File(visible=False)
        api_answers = gr.JSON(visible=False)
        gr.Button(visible=False).click(lambda clip, *texts: _api_answers(service, clip, *texts),
                                       [api_video, subtitle, video_description, audio_description], api_answers,
                                       api_name="predict", concurrency_id=DEVICE)
    return page


def _page_updates(service: Service, columns: list[_Column], clip, text, found, described_video, described_audio):
    """The page's outputs as the answers come; a refused request is a notice and the status line."""
    blank = ["", "", "", None]
    try:
        events = service.answers(clip, text or "", described_video or "", described_audio or "",
                                 found if text else "none")
        first = True
        for event in events:
            updates: list[Any] = [gr.skip()] * (1 + len(blank) * len(columns))
            if first:
                updates = [_said("answering...")] + blank * len(columns)
                first = False
            k = 1 + event.index * len(blank)
            if isinstance(event, Partial):
                updates[k + 1] = event.text
            else:
                updates[k:k + len(blank)] = _shown(event)
                updates[0] = "" if event.index == len(columns) - 1 else _said("answering...")
            yield updates
    except UserError as err:  # the message on the page (a notice and the status line), never a failed event
        message = _refused(clip, err)
        gr.Warning(message, duration=None, title="xmei")
        yield [_said(message, bold=True)] + blank * len(columns)


def _said(text: str, bold: bool = False) -> str:
    """The status line's HTML."""
    return f"<b>{escape(text)}</b>" if bold else f"<span>{escape(text)}</span>"


def _shown(answer: Answered) -> list:
    """A column's outputs: the labels (a bar per label where the answer has probabilities), the
    explanation, the evidence (images and notes) and the JSON file."""
    p = answer.prediction
    labels = "".join(_label_html(kind, label, probs)
                     for kind, label, probs in (("emotion", p.emotion, p.emotion_probs),
                                                ("intent", p.intent, p.intent_probs)))
    return [labels, p.explanation if p.explanation is not None else p.text, _evidence_html(answer),
            str(answer.json_path)]


def _label_html(kind: str, label: str | None, probs: dict[str, float] | None) -> str:
    """The answer's label, then (when there are probabilities) one bar per label, most probable first."""
    head = f'<div class="xmei-kind">{kind}</div><div class="xmei-label">{escape(label or "invalid (unparsed)")}</div>'
    if not probs:
        return f'<div class="xmei-labels" data-kind="{kind}">{head}</div>'
    bars = "".join(
        f'<div class="xmei-bar{" xmei-answer" if name == label else ""}" data-label="{escape(name)}" '
        f'data-p="{p:.6f}"><span>{escape(name)}</span><span class="xmei-track"><span style="width:{100 * p:.1f}%">'
        f'</span></span><span>{100 * p:.0f}%</span></div>'
        for name, p in sorted(probs.items(), key=lambda item: -item[1]))
    return f'<div class="xmei-labels" data-kind="{kind}">{head}{bars}</div>'


def _evidence_html(answer: Answered) -> str:
    """The frames (under attention where the model sees them), the waveform and the notes."""
    parts = []
    for kind, image, caption in (
            ("frames", answer.frames, "the sampled frames" + (", under the visual LQ-Former's attention (a row per "
                                      "query group: caption queries, then learned ones)"
                                      if answer.prediction.visual_attention else "")),
            ("audio", answer.audio, "the waveform and the sampled windows" + (
                ", coloured by the audio LQ-Former's attention (green: an even share, red: twice it or more; a "
                "lane group per query group)" if answer.prediction.audio_attention else ""))):
        if image is not None:
            parts.append(f'<figure class="xmei-{kind}"><img alt="{kind}" src="{_data_uri(image)}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    notes = "".join(f"<li>{escape(n)}</li>" for n in answer.notes)
    return "".join(parts) + (f'<ul class="xmei-notes">{notes}</ul>' if notes else "")


def _data_uri(image) -> str:
    """The image inline (PNG), so the page needs no file route for it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _api_answers(service: Service, clip, text, described_video, described_audio) -> list[dict]:
    """``/predict``: every checkpoint's whole answer."""
    try:
        answered = [e for e in service.answers(clip, text or "", described_video or "", described_audio or "")
                    if isinstance(e, Answered)]
    except UserError as err:  # gradio_client raises AppError with the message
        raise gr.Error(_refused(clip, err), print_exception=False) from None
    return [a.to_json() for a in answered]


def _refused(clip, err: UserError) -> str:
    """The message of a refused request, logged in one line."""
    log.info("refused %s: %s", Path(clip).name if clip else "(no clip)", err)
    return str(err) if isinstance(err, ServeError) else f"cannot answer: {err}"


def serve(service: Service, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page on ``host:port``; ``block`` False returns the running page (tests)."""
    page = build_page(service)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, show_error=False,
                ssr_mode=False, css=CSS, footer_links=["api"], allowed_paths=[str(service.files)])
    return page
