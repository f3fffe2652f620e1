"""The Flask app: the chat page, nanochat's streaming protocol, an OpenAI-compatible API, health
and metrics, all in front of one continuous-batching scheduler.

Every request is validated (validation.py) before it reaches the scheduler; every error, whatever
its cause, is a JSON body in OpenAI's error shape. A stream whose client goes away cancels its
requests, which frees their slots at the next tick.
"""
import hmac
import json
import logging
import queue
import secrets
import time
import uuid
from pathlib import Path

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from nanochat_jax.serving import QueueFull, Request, Sampling, StopMatcher, StreamingDecoder
from nanochat_jax.web import validation
from nanochat_jax.web.metrics import Metrics

log = logging.getLogger(__name__)
PAGE = Path(__file__).parent / "static" / "index.html"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
POLL_S = 0.25  # how often a waiting stream checks that its client is still there


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "server_error"}.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(json.dumps(body), status=status, mimetype="application/json")


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def create_app(scheduler, tokenizer, *, model_name: str = "nanochat-jax", api_key: str | None = None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = validation.MAX_BODY_BYTES
    metrics, context = Metrics(), scheduler.pool.context

    def submit(chat: validation.ChatRequest) -> list[Request]:
        """One scheduler request per choice, sharing one event queue; 429 if they do not all fit."""
        events, seed = queue.Queue(), secrets.randbits(32) if chat.seed is None else chat.seed
        requests = []
        try:
            for i in range(chat.n):
                sampling = Sampling(chat.temperature, chat.top_k, chat.top_p, seed, i)
                requests.append(scheduler.submit(Request(chat.prompt, chat.max_tokens, sampling, events)))
        except QueueFull as err:
            for r in requests:
                r.cancel()
            raise validation.RequestError(f"the server is busy: {err}; retry shortly", status=429,
                                          code="server_busy") from None
        return requests

    def pieces(chat, requests, disconnected):
        """(choice index, new text, finish reason or None) as tokens arrive; cancels on exit."""
        decoders = [StreamingDecoder(tokenizer) for _ in requests]
        stops = [StopMatcher(list(chat.stop)) for _ in requests]
        index, remaining, started = {r: i for i, r in enumerate(requests)}, len(requests), set()
        try:
            while remaining:
                try:
                    req, token = requests[0].events.get(timeout=POLL_S)
                except queue.Empty:
                    if disconnected():
                        return
                    continue
                i = index[req]
                if token is None:
                    remaining -= 1
                    text = "" if stops[i].stopped else stops[i].push(decoders[i].flush()) + stops[i].flush()
                    reason = "length" if req.finish_reason == "length" and not stops[i].stopped else "stop"
                    metrics.tokens(len(chat.prompt) if i == 0 else 0, req.num_generated)
                    yield i, text, reason
                    continue
                if i not in started:
                    started.add(i)
                    metrics.first_token(req.first_token_at - req.submitted_at)
                if stops[i].stopped:
                    continue
                text = stops[i].push(decoders[i].push(token))
                if stops[i].stopped:
                    req.cancel()
                if text:
                    yield i, text, None
        finally:
            for r in requests:
                r.cancel()

    def endpoint() -> str:
        """The route, not the raw path, so that metrics labels stay few."""
        return request.url_rule.rule if request.url_rule else "unknown"

    def client_gone():
        return request.environ.get("waitress.client_disconnected", lambda: False)

    @app.before_request
    def check_key():
        if api_key and (request.path.startswith("/v1/") or request.method == "POST"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                metrics.request(endpoint(), 401)
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")

    @app.errorhandler(validation.RequestError)
    def request_error(err):
        metrics.request(endpoint(), err.status)
        return error_response(err.status, str(err), err.param, err.code)

    @app.errorhandler(HTTPException)
    def http_error(err):
        metrics.request(endpoint(), err.code)
        return error_response(err.code, err.description or err.name)

    @app.errorhandler(Exception)
    def internal_error(err):
        log.exception("unexpected error on %s", request.path)
        metrics.request(endpoint(), 500)
        return error_response(500, "internal server error")

    @app.get("/")
    def page():
        return Response(PAGE.read_bytes(), mimetype="text/html")

    @app.get("/health")
    def health():
        return {"status": "ok", "ready": True, "model": model_name, "slots": scheduler.pool.slots,
                "active_slots": len(scheduler.active), "queue_depth": scheduler.waiting.qsize(), "context": context}

    @app.get("/metrics")
    def metrics_page():
        return Response(metrics.render(scheduler), mimetype="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "nanochat-jax"}]}

    @app.post("/chat/completions")
    def nanochat_chat():
        """nanochat's protocol: SSE of {"token": text, "gpu": 0} events, then {"done": true}."""
        chat = validation.nanochat_request(validation.parse_body(request.get_data()), tokenizer, context)
        requests, gone = submit(chat), client_gone()
        metrics.request(endpoint(), 200)

        def events():
            for _, text, reason in pieces(chat, requests, gone):
                if text:
                    yield sse({"token": text, "gpu": 0})
            yield sse({"done": True})
        return Response(events(), mimetype="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    def openai_chat():
        chat = validation.openai_request(validation.parse_body(request.get_data()), tokenizer, context)
        requests, gone = submit(chat), client_gone()
        metrics.request(endpoint(), 200)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        usage = lambda: {"prompt_tokens": len(chat.prompt), "completion_tokens": sum(r.num_generated for r in requests),
                         "total_tokens": len(chat.prompt) + sum(r.num_generated for r in requests)}
        if not chat.stream:
            texts, reasons = [""] * chat.n, [None] * chat.n
            for i, text, reason in pieces(chat, requests, gone):
                texts[i] += text
                reasons[i] = reason or reasons[i]
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage()}

        def chunk(choices, **extra):
            return sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

        def events():
            extra = {"usage": None} if chat.include_usage else {}
            for i in range(chat.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], **extra)
            for i, text, reason in pieces(chat, requests, gone):
                if text:
                    yield chunk([{"index": i, "delta": {"content": text}, "finish_reason": None}], **extra)
                if reason:
                    yield chunk([{"index": i, "delta": {}, "finish_reason": reason}], **extra)
            if chat.include_usage:
                yield chunk([], usage=usage())
            yield sse("[DONE]")
        return Response(events(), mimetype="text/event-stream", headers=SSE_HEADERS)

    return app
