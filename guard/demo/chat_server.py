"""A demo inference server: OpenAI-compatible ``POST /v1/chat/completions`` on SmolLM2, guarded.

Every generation runs with the guard attached (``guard.host.attach``): the prompt rows and
each generated token's row go to the sidecar over its Unix socket; a STEER verdict changes the
residual stream, an ABORT ends the generation and the HTTP client gets a refusal naming the
decision id (``finish_reason: "content_filter"`` and a ``guard`` object). Streaming
(``"stream": true``) sends server-sent events in OpenAI's chunk format.

The prompt is rendered by :func:`guard.host.chat.render` (the path calibration takes too), so
every row the guard gets carries its role: the user's words, the template's markup (role
headers, the default system prompt, the assistant-turn opener) or generated tokens; the
detectors read the roles they chose.

It is a demo: one generation at a time (a lock; the model is not thread-safe for parallel
generate calls), stdlib ``http.server``, batch size 1. Malformed requests get 4xx with an
OpenAI-style JSON error body.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from guard.host.attach import Attachment, GuardAbort

log = structlog.get_logger("guard.demo.runner")
_TRACER = trace.get_tracer("guard.demo.chat_server")

MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_BODY_BYTES = 1 << 20
MAX_NEW_TOKENS = 512
_ROLES = {"system", "user", "assistant"}


class BadRequest(Exception):
    """A malformed HTTP request; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None,
                 status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Mapping[str, str], ...]
    max_tokens: int
    temperature: float
    stream: bool


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate a chat completion request body; BadRequest names the field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {role, content}", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}]: expected an object", f"messages[{index}]")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise BadRequest(f"messages[{index}].role: expected one of "
                             f"{', '.join(sorted(_ROLES))}, found {role!r}",
                             f"messages[{index}].role")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content: expected a string",
                             f"messages[{index}].content")
    max_tokens = data.get("max_tokens", data.get("max_completion_tokens", 128))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not (
        1 <= max_tokens <= MAX_NEW_TOKENS
    ):
        raise BadRequest(f"max_tokens: expected an integer from 1 to {MAX_NEW_TOKENS}, "
                         f"found {max_tokens!r}", "max_tokens")
    temperature = data.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
        0 <= temperature <= 2
    ):
        raise BadRequest(f"temperature: expected a number from 0 to 2, found {temperature!r}",
                         "temperature")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected true or false, found {stream!r}", "stream")
    return ChatRequest(tuple({"role": m["role"], "content": m["content"]} for m in messages),
                       max_tokens, float(temperature), stream)


@dataclass
class Generation:
    """The outcome of one guarded generation."""

    request_id: str
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    aborted: GuardAbort | None = None
    #: Decision ids of the guard's verdicts for this request, in order.
    decisions: list[str] = field(default_factory=list)
    #: Actions seen (CONTINUE / STEER / ABORT), by name.
    actions: list[str] = field(default_factory=list)
    #: The generation hit max_tokens.
    truncated: bool = False
    #: The trace this request was served in ("" without an OpenTelemetry SDK).
    trace_id: str = ""

    @property
    def finish_reason(self) -> str:
        if self.aborted is not None:
            return "content_filter"
        return "length" if self.truncated else "stop"

    def guard_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "request_id": self.request_id,
            "decisions": len(self.decisions),
            "steered": "STEER" in self.actions,
        }
        if self.trace_id:
            summary["trace_id"] = self.trace_id
        if self.aborted is not None:
            verdict = self.aborted.verdict
            summary.update(action="ABORT", decision_id=verdict.decision_id,
                           details=verdict.details or verdict.reason, source=verdict.source)
        else:
            summary["action"] = "STEER" if "STEER" in self.actions else "CONTINUE"
        return summary


def refusal_text(generation: Generation) -> str:
    assert generation.aborted is not None
    verdict = generation.aborted.verdict
    return (f"[Blocked by Activation Guard: decision {verdict.decision_id or '-'}: "
            f"{verdict.details or verdict.reason}]")


class ChatService:
    """Runs guarded generations on one model, one at a time."""

    def __init__(self, model: Any, tokenizer: Any, attachment: Attachment | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.attachment = attachment
        self._lock = threading.Lock()

    def _inputs(self, request: ChatRequest) -> tuple[Any, Any]:
        """The prompt's token ids ``[1, T]`` and each position's role."""
        import torch

        from guard.host.chat import render

        ids, roles = render(self.tokenizer, request.messages)
        return torch.tensor([ids], dtype=torch.long), roles

    def generate(self, request: ChatRequest) -> Iterator[tuple[str, Generation]]:
        """Yield text pieces as they are generated; the last yield has the final state."""
        from transformers import TextIteratorStreamer

        with self._lock:
            generation = Generation(request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}")
            span_context = trace.get_current_span().get_span_context()
            if span_context.is_valid:
                generation.trace_id = format(span_context.trace_id, "032x")
            input_ids, roles = self._inputs(request)
            generation.prompt_tokens = int(input_ids.shape[1])
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                            skip_special_tokens=True)
            first_verdict = len(self.attachment.verdicts) if self.attachment else 0
            outcome: dict[str, Any] = {}

            def run() -> None:
                import torch

                kwargs: dict[str, Any] = {"max_new_tokens": request.max_tokens,
                                          "streamer": streamer}
                if request.temperature > 0:
                    kwargs.update(do_sample=True, temperature=request.temperature)
                else:
                    kwargs.update(do_sample=False)
                try:
                    with torch.no_grad():
                        if self.attachment is not None:
                            with self.attachment.request(generation.request_id, roles=roles):
                                outcome["ids"] = self.model.generate(input_ids, **kwargs)
                        else:
                            outcome["ids"] = self.model.generate(input_ids, **kwargs)
                except GuardAbort as abort:
                    outcome["abort"] = abort
                except Exception as exc:  # reported to the HTTP client as a 500
                    outcome["error"] = exc
                finally:
                    streamer.end()  # type: ignore[no-untyped-call]  # transformers is untyped here

            # The worker continues this thread's trace (the HTTP request's span).
            worker = threading.Thread(target=contextvars.copy_context().run, args=(run,),
                                      name="guard-demo-generate", daemon=True)
            worker.start()
            for piece in streamer:
                generation.text += piece
                if piece:
                    yield piece, generation
            worker.join()
            if "error" in outcome:
                raise outcome["error"]
            generation.aborted = outcome.get("abort")
            if "ids" in outcome:
                generation.tokens = int(outcome["ids"].shape[1]) - generation.prompt_tokens
                generation.truncated = generation.tokens >= request.max_tokens
            if self.attachment is not None:
                for verdict in self.attachment.verdicts[first_verdict:]:
                    generation.decisions.append(verdict.decision_id)
                    generation.actions.append(verdict.action.name)
            log.info("chat completion", request_id=generation.request_id,
                     tokens=generation.tokens, action=generation.guard_summary()["action"])
            yield "", generation


def completion_body(generation: Generation, created: int) -> dict[str, Any]:
    content = refusal_text(generation) if generation.aborted else generation.text
    if generation.aborted is not None and generation.text:
        content = f"{generation.text}\n{content}"
    return {
        "id": generation.request_id,
        "object": "chat.completion",
        "created": created,
        "model": MODEL_NAME,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": generation.finish_reason}],
        "usage": {"prompt_tokens": generation.prompt_tokens,
                  "completion_tokens": generation.tokens,
                  "total_tokens": generation.prompt_tokens + generation.tokens},
        "guard": generation.guard_summary(),
    }


def make_handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "activation-guard-demo/0.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http", request=format % args)

        def _json(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
            raw = json.dumps(body).encode()
            trace.get_current_span().set_attribute("http.response.status_code", int(status))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, error: BadRequest) -> None:
            self._json(error.status, {"error": {"message": str(error),
                                                "type": "invalid_request_error",
                                                "param": error.param, "code": None}})

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._json(HTTPStatus.OK, {"object": "list", "data": [
                    {"id": MODEL_NAME, "object": "model", "owned_by": "activation-guard"}]})
            elif self.path == "/healthz":
                self._json(HTTPStatus.OK, {"status": "ok"})
            else:
                self._error(BadRequest(f"no route GET {self.path}", status=HTTPStatus.NOT_FOUND))

        def do_POST(self) -> None:
            if self.path != "/v1/chat/completions":
                self._error(BadRequest(f"no route POST {self.path}",
                                       status=HTTPStatus.NOT_FOUND))
                return
            # A server span per request, continuing the caller's W3C trace context if sent.
            with _TRACER.start_as_current_span(
                "POST /v1/chat/completions", context=propagate.extract(self.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": "POST", "http.route": self.path,
                            "url.path": self.path},
            ):
                self._chat()

        def _chat(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                self._error(BadRequest("Content-Length: expected an integer"))
                return
            if length > MAX_BODY_BYTES:
                self._error(BadRequest(f"the body exceeds {MAX_BODY_BYTES} bytes",
                                       status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE))
                return
            try:
                request = parse_chat_request(self.rfile.read(length))
            except BadRequest as error:
                self._error(error)
                return
            created = int(time.time())
            if request.stream:
                self._stream(request, created)
                return
            try:
                *_, (_, generation) = service.generate(request)
            except Exception:
                log.exception("generation failed")
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {
                    "message": "generation failed; see the server log", "type": "server_error",
                    "param": None, "code": None}})
                return
            self._json(HTTPStatus.OK, completion_body(generation, created))

        def _stream(self, request: ChatRequest, created: int) -> None:
            trace.get_current_span().set_attribute("http.response.status_code", HTTPStatus.OK)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(generation: Generation, delta: dict[str, Any], finish: str | None,
                      extra: Mapping[str, Any] | None = None) -> None:
                chunk: dict[str, Any] = {
                    "id": generation.request_id, "object": "chat.completion.chunk",
                    "created": created, "model": MODEL_NAME,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                chunk.update(extra or {})
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            first = True
            try:
                for piece, generation in service.generate(request):
                    if first:
                        event(generation, {"role": "assistant", "content": ""}, None)
                        first = False
                    if piece:
                        event(generation, {"content": piece}, None)
                if generation.aborted is not None:
                    event(generation, {"content": ("\n" if generation.text else "")
                                       + refusal_text(generation)}, None)
                event(generation, {}, generation.finish_reason,
                      {"guard": generation.guard_summary()})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                log.info("client went away during a stream")

    return Handler


def serve_http(service: ChatService, host: str, port: int) -> ThreadingHTTPServer:
    """Start the HTTP server in a daemon thread; returns it (``server_address`` has the port)."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="guard-demo-http", daemon=True)
    thread.start()
    log.info("demo server listening", url=f"http://{host}:{server.server_address[1]}")
    return server
