"""The service's routes (Starlette): /v1/embeddings, /v1/search, /v1/classify, /thumbnails/{name}, /healthz,
/metrics, the page at / and its /static files; errors as JSON {"error": {"message", "field", "type"}}."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import os
import threading
import time
import urllib.parse

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dualenc import evaluate, templates as templates_
from dualenc.errors import InputError
from dualenc.search import index as search_index
from dualenc.serve import limits as checks
from dualenc.serve.batcher import Batcher, Stopping
from dualenc.serve.limits import ApiError, Limits
from dualenc.serve.metrics import CONTENT_TYPE, Metrics
from dualenc.serve.thumbnails import Thumbnails

LOG = logging.getLogger("dualenc.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
CLASSIFIER_CACHE = 32  # label sets whose zero-shot weights are kept
INLINE_TEXTS = 8  # texts tokenized on the event loop (more go to a worker thread)
API_ROUTES = ("/v1/embeddings", "/v1/search", "/v1/classify")
INLINE_SEARCH_ROWS = 100_000  # indexes searched on the event loop (larger ones in a worker thread)


def shown(name: str) -> str:
    """A name as JSON can carry it: bytes of a file name that is not UTF-8 (surrogate escapes) as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Service:
    """What the routes share: the model behind its batcher, the index and its names, limits, metrics.

    Args:
      params, config, processor: the model.
      name: the model's name in responses.
      index: an EmbeddingIndex to search (dualenc.search.open_index), or None.
      image_root: the folder the index's names are paths in (thumbnails), default the current one.
      dtype, max_batch, batching, devices: the Batcher's.
      limits: a Limits.
      api_key: required on /v1/* (Authorization: Bearer KEY, or x-api-key: KEY) when given.
    """

    def __init__(self, params, config, processor, *, name: str = "dualenc", index=None, image_root=None,
                 dtype=None, max_batch: int = 64, batching: bool = True, devices=None, limits: Limits = Limits(),
                 api_key: str | None = None):
        self.params, self.config, self.processor, self.name = params, config, processor, name
        self.batcher_options = dict(dtype=dtype, max_batch=max_batch, batching=batching, devices=devices)
        self.index, self.limits, self.api_key = index, limits, api_key
        self.precision = "float32" if dtype is None else np.dtype(dtype).name
        self.rule = evaluate.zero_shot_logit_rule(params)
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        self.in_flight = 0
        self.classifiers: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()
        self.rows, self.names, self.thumbnails = {}, [], None
        if index is not None:
            self.names = [shown(n) for n in index.names()]
            for row, n in enumerate(self.names):
                self.rows.setdefault(n, row)
            self.thumbnails = Thumbnails(os.getcwd() if image_root is None else image_root, self.rows, limits)
        self.metrics.gauge("dualenc_queued_rows", "Inputs waiting for a batch.",
                           lambda: 0 if self.batcher is None else self.batcher.pending())
        self.metrics.gauge("dualenc_requests_in_flight", "Requests being answered.", lambda: self.in_flight)
        self.metrics.gauge("dualenc_index_rows", "Rows of the served index.", lambda: len(self.names))

    def start(self) -> None:
        self.batcher = Batcher(self.params, self.config, self.processor, metrics=self.metrics,
                               **self.batcher_options)
        self.metrics.batch_rows.buckets = self.batcher.sizes

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    # ------------------------------------------------------------------------------------------- model calls

    async def embed(self, tower: str, arrays: dict) -> np.ndarray:
        if self.batcher is None:
            raise Stopping("the service is not running")
        return await asyncio.wrap_future(self.batcher.submit(tower, arrays))

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, int]:
        if self.batcher is None:
            raise Stopping("the service is not running")
        if len(texts) <= INLINE_TEXTS:
            arrays, tokens = self.batcher.prepare_texts(texts)
        else:
            arrays, tokens = await run_in_threadpool(self.batcher.prepare_texts, texts)
        return await self.embed("text", arrays), sum(tokens)

    async def embed_images(self, values: list, fields: list[str]) -> np.ndarray:
        """Embeddings of images given as base64 or data URLs (`fields` name them in errors); each is checked,
        decoded and prepared in one worker thread."""
        if self.batcher is None:
            raise Stopping("the service is not running")
        return await self.embed("image", await run_in_threadpool(self.prepare_images, values, fields))

    def prepare_images(self, values: list, fields: list[str]) -> dict:
        images = [checks.image_bytes(v, f, self.limits) for v, f in zip(values, fields)]
        try:
            return self.batcher.prepare_images(images, fields)
        except InputError as e:
            message = str(e)
            field = next((f for f in fields if message.startswith(f"({f})")), fields[0])
            reason = message[len(f"({field})"):].strip() if message.startswith(f"({field})") else "cannot be read"
            raise ApiError(400, f"{field}: {reason}", field) from None

    # ------------------------------------------------------------------------------------------------ routes

    async def embeddings(self, request: Request) -> Response:
        body = checks.parse_json(await read_body(request, self.limits))
        checks.known_fields(body, {"input", "model", "encoding_format", "user"})
        if "input" not in body:
            raise ApiError(422, "input is missing", "input")
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise ApiError(422, "model must be a string", "model")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
        items = body["input"]
        items = [items] if isinstance(items, str) else checks.count(items, "input", self.limits.max_inputs,
                                                                   "inputs")
        texts, images = [], []
        for i, item in enumerate(items):
            field = f"input[{i}]"
            if isinstance(item, dict) and len(item) == 1 and "text" in item:
                item, field = item["text"], field + ".text"
            if isinstance(item, str):
                texts.append((i, checks.text(item, field, self.limits)))
            elif isinstance(item, dict) and len(item) == 1 and "image" in item:
                images.append((i, item["image"], field + ".image"))
            else:
                raise ApiError(422, f"{field} must be a string, {{\"text\": ...}} or {{\"image\": ...}}", field)
        out = np.zeros((len(items), self.config.projection_dim), np.float32)
        tokens = 0
        jobs = []
        if texts:
            jobs.append(self.embed_texts([t for _, t in texts]))
        if images:
            jobs.append(self.embed_images([v for _, v, _ in images], [f for _, _, f in images]))
        done = await asyncio.gather(*jobs)
        if texts:
            (text_embeds, tokens), done = done[0], done[1:]
            out[[i for i, _ in texts]] = text_embeds
        if images:
            out[[i for i, _, _ in images]] = done[0]
        data = [{"object": "embedding", "index": i,
                 "embedding": encoded(row, encoding)} for i, row in enumerate(out)]
        return JSONResponse({"object": "list", "model": self.name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "images": len(images)}})

    async def search(self, request: Request) -> Response:
        body = checks.parse_json(await read_body(request, self.limits))
        checks.known_fields(body, {"query", "top_k"})
        if self.index is None:
            raise ApiError(404, "no index is served (start the service with --index)", "query", "not_found")
        query = body.get("query")
        if query is None:
            raise ApiError(422, "query is missing", "query")
        if isinstance(query, str):
            query = {"text": query}
        if not isinstance(query, dict) or len(query) != 1 or next(iter(query)) not in ("text", "image", "item"):
            raise ApiError(422, "query must be a string, or one of {\"text\"}, {\"image\"}, {\"item\"}", "query")
        (kind, value), = query.items()
        k = checks.top_k(body.get("top_k"), self.limits, self.index.count)
        leave_out = None
        if kind == "text":
            vectors, _ = await self.embed_texts([checks.text(value, "query.text", self.limits)])
        elif kind == "image":
            vectors = await self.embed_images([value], ["query.image"])
        else:
            if not isinstance(value, str) or value not in self.rows:
                raise ApiError(404, "query.item names no item of the index", "query.item", "not_found")
            leave_out = [self.rows[value]]
            vectors = np.asarray(self.index.embeddings[leave_out], np.float32)
        if leave_out is None and self.index.count < INLINE_SEARCH_ROWS:
            found = search_index.search(self.index, vectors, k)
            scores, rows = found.scores[0], found.rows[0]
        elif leave_out is None:
            found = await run_in_threadpool(search_index.search, self.index, vectors, k)
            scores, rows = found.scores[0], found.rows[0]
        elif self.index.count > 1:
            scores, rows = await run_in_threadpool(search_index.search_exact, self.index, vectors,
                                                   min(k, self.index.count - 1), leave_out=leave_out)
            scores, rows = scores[0], rows[0]
        else:
            scores, rows = np.zeros(0, np.float32), np.zeros(0, np.int64)
        results = [{"rank": r + 1, "name": self.names[i], "score": float(s),
                    "thumbnail": "/thumbnails/" + urllib.parse.quote(self.names[i], safe="/")}
                   for r, (s, i) in enumerate(zip(scores.tolist(), rows.tolist())) if i >= 0]
        return JSONResponse({"model": self.name, "results": results})

    async def classify(self, request: Request) -> Response:
        body = checks.parse_json(await read_body(request, self.limits))
        checks.known_fields(body, {"labels", "images", "templates"})
        labels = checks.count(body.get("labels"), "labels", self.limits.max_labels, "labels")
        labels = [checks.text(v, f"labels[{i}]", self.limits) for i, v in enumerate(labels)]
        prompts = self.templates(body.get("templates", "default"))
        if len(labels) * len(prompts) > self.limits.max_prompts:
            raise ApiError(413, f"{len(labels)} labels x {len(prompts)} templates make more than "
                                f"{self.limits.max_prompts} prompts", "templates", "too_large")
        values = checks.count(body.get("images"), "images", self.limits.max_inputs, "images")
        fields = [f"images[{i}]" for i in range(len(values))]
        classifier, image_embeds = await asyncio.gather(self.classifier(labels, prompts),
                                                        self.embed_images(values, fields))
        top, probs = evaluate.zero_shot_predict(image_embeds, classifier, k=len(labels), **self.rule)
        results = [{"labels": [labels[j] for j in row], "probabilities": [float(p) for p in ps]}
                   for row, ps in zip(top.tolist(), probs)]
        return JSONResponse({"model": self.name, "results": results})

    def templates(self, value) -> list[str]:
        if isinstance(value, str) and value not in templates_.TEMPLATE_SETS:
            raise ApiError(422, f"templates must be a list of templates or one of "
                                f"{', '.join(templates_.TEMPLATE_SETS)}", "templates")
        if isinstance(value, list):
            checks.count(value, "templates", self.limits.max_prompts, "templates")
            for i, t in enumerate(value):
                checks.text(t, f"templates[{i}]", self.limits)
        elif not isinstance(value, str):
            raise ApiError(422, "templates must be a list of strings", "templates")
        try:
            return templates_.resolve(value)
        except InputError as e:
            raise ApiError(422, str(e), "templates") from None

    async def classifier(self, labels: list[str], prompts: list[str]) -> np.ndarray:
        """Zero-shot weights as dualenc.evaluate.zero_shot_classifier builds them, kept for label sets asked again."""
        key = (tuple(labels), tuple(prompts))
        with self.lock:
            if key in self.classifiers:
                self.classifiers.move_to_end(key)
                return self.classifiers[key]
        texts = [templates_.fill(t, c) for c in labels for t in prompts]
        embeds, _ = await self.embed_texts(texts)
        weights = evaluate.class_weights(embeds, len(labels))
        with self.lock:
            self.classifiers[key] = weights
            while len(self.classifiers) > CLASSIFIER_CACHE:
                self.classifiers.popitem(last=False)
        return weights

    async def thumbnail(self, request: Request) -> Response:
        if self.thumbnails is None:
            raise ApiError(404, "no index is served, so no thumbnails", "name", "not_found")
        data = await run_in_threadpool(self.thumbnails.get, request.path_params["name"])
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def healthz(self, request: Request) -> Response:
        index = None if self.index is None else {"rows": self.index.count, "dims": self.index.dims}
        return JSONResponse({"status": "ok" if self.batcher is not None else "starting", "model": self.name,
                             "index": index, "precision": self.precision,
                             "devices": self.batcher.rows_split.mesh.size if self.batcher else None,
                             "batch_sizes": list(self.batcher.sizes) if self.batcher else None,
                             "compiles": self.metrics.compile_count(), "api_key": bool(self.api_key)})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type=CONTENT_TYPE)

    async def page(self, request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")


def encoded(row: np.ndarray, encoding: str):
    if encoding == "base64":
        import base64

        return base64.b64encode(np.ascontiguousarray(row, "<f4").tobytes()).decode("ascii")
    return row.tolist()


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused (413, field "body") past limits.max_body_bytes whatever its Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
        raise ApiError(413 if declared.isdigit() else 400, f"the request body is larger than "
                       f"{limits.max_body_bytes} bytes" if declared.isdigit() else "bad Content-Length", "body",
                       "too_large" if declared.isdigit() else "invalid_request_error")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes", "body",
                           "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, field=None, kind="invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, field, kind).body(), status_code=status, headers=headers)


def _endpoint(service: Service, handler):
    """A route's handler under the request timeout, its refusals as JSON errors."""

    async def endpoint(request: Request) -> Response:
        try:
            return await asyncio.wait_for(handler(request), service.limits.timeout_s)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except asyncio.TimeoutError:
            return _error(504, f"the request took longer than {service.limits.timeout_s:g} s", None, "timeout")
        except Stopping as e:
            return _error(503, str(e), None, "unavailable")

    return endpoint


class Guard:
    """ASGI middleware: the API key on /v1/*, request metrics, and the last word on errors: an exception no
    handler took is logged and answered with a JSON 500 that shows nothing of it."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        service = self.service

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        service.in_flight += 1
        try:
            if scope["path"].startswith("/v1/") and service.api_key and not self.authorised(scope):
                response = _error(401, "a valid API key is required (Authorization: Bearer KEY or x-api-key)",
                                  "authorization", "unauthorized", {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, sending)
                return
            try:
                await self.app(scope, receive, sending)
            except Exception:  # noqa: BLE001
                LOG.exception("error answering %s %s", scope.get("method"), scope.get("path"))
                if status[0] == 500:
                    await _error(500, "internal error", None, "internal_error")(scope, receive, sending)
        finally:
            service.in_flight -= 1
            route = getattr(scope.get("route"), "path", None) or \
                (scope["path"] if scope["path"] in API_ROUTES else "unmatched")  # refused before routing
            service.metrics.request(route, scope.get("method", ""), status[0], time.perf_counter() - start)

    def authorised(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.service.api_key.encode())


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else "http_error",
                  getattr(exc, "headers", None))


def create_app(service: Service) -> Starlette:
    """The ASGI app of a Service: its batcher starts with the app's lifespan and, at shutdown, runs what is
    queued before it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    routes = [
        Route("/v1/embeddings", _endpoint(service, service.embeddings), methods=["POST"]),
        Route("/v1/search", _endpoint(service, service.search), methods=["POST"]),
        Route("/v1/classify", _endpoint(service, service.classify), methods=["POST"]),
        Route("/thumbnails/{name:path}", _endpoint(service, service.thumbnail), methods=["GET"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/metrics", service.prometheus, methods=["GET"]),
        Route("/", service.page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
    app.add_middleware(Guard, service=service)
    app.state.service = service
    return app
