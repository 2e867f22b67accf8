"""The playground's HTTP server: the pages (static files of this package) and the JSON API they use.

Standard library only (`http.server.ThreadingHTTPServer`): the core install stays as it is, and a local,
single-user playground needs no ASGI stack. Each request runs on its own thread; requests for one model queue on
its lock. API (README documents it with curl examples):

    GET  /api/models                  [{"name", "kind", "path", "notes", ("labels", "text_count")}]
    POST /api/fill-mask               {"model", "text", "top_k"?} -> {"tokens", "masks": [{"position", "candidates"}]}
    POST /api/nsp                     {"model", "a", "b"} -> {"is_next"}
    POST /api/attention               {"model", "text", "text_b"?} -> {"tokens", "layers", "heads", "weights"}
    POST /api/predict                 {"model", "text", "text_b"?} | {"model", "question", "context"} -> task output
    GET  /api/runs                    [{"name", "path"}]
    GET  /api/runs/NAME               {"name", "path", "config", "checkpoints"}
    GET  /api/runs/NAME/metrics       the rows of NAME's metrics.jsonl

Every error is a 4xx status with {"error": "one line"} (a bug of ours: 500, still one line, never a traceback).
Files are served from a fixed table read at start-up, and runs and models are found by name in the start-up
table: no path is ever built from a request.
"""

from __future__ import annotations

import json
import math
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from bertforge.errors import BertforgeError
from bertforge.monitor import read_metrics
from bertforge.serve import inference
from bertforge.serve.models import PRETRAINING, ServedModel, ServedRun, Table

MAX_BODY_BYTES = 256 * 1024
# URL path -> (file in bertforge/serve/static, content type)
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Request fields of each POST endpoint: name -> (type, required). "model" is checked first, as it decides the rest.
TEXT, OPTIONAL_TEXT = (str, True), (str, False)
FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "fill-mask": {"text": TEXT, "top_k": (int, False)},
    "nsp": {"a": TEXT, "b": TEXT},
    "attention": {"text": TEXT, "text_b": OPTIONAL_TEXT},
    "classify": {"text": TEXT, "text_b": OPTIONAL_TEXT},
    "ner": {"text": TEXT},
    "qa": {"question": TEXT, "context": TEXT},
}


class ApiError(Exception):
    """A request the API refuses: its HTTP status and one line for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged run's loss) -> None, since JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _check_fields(body: dict[str, Any], spec: dict[str, tuple[type, bool]]) -> dict[str, Any]:
    """The body's fields after "model", typed as `spec` says; unknown names are refused (they are typos)."""
    unknown = sorted(set(body) - set(spec) - {"model"})
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0]!r}; this endpoint takes "
                                               f"{', '.join(['model', *spec])}")
    fields = {}
    for name, (kind, required) in spec.items():
        value = body.get(name)
        if value is None:
            if required:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} is required ({kind.__name__})")
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} must be a {kind.__name__}, "
                                                   f"got {type(value).__name__}")
        fields[name] = value
    return fields


class Playground:
    """The routes over one start-up `Table`; separate from the HTTP plumbing so each route reads as a function."""

    def __init__(self, table: Table) -> None:
        self.table = table
        static = resources.files("bertforge.serve") / "static"
        self.files = {path: ((static / name).read_bytes(), content_type)
                      for path, (name, content_type) in STATIC_FILES.items()}

    def model(self, body: dict[str, Any]) -> ServedModel:
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'model' is required (the name of a served model)")
        if name not in self.table.models:
            known = ", ".join(self.table.models) or "none"
            raise ApiError(HTTPStatus.NOT_FOUND, f"no model named {name!r}; this server has: {known}")
        return self.table.models[name]

    def post(self, endpoint: str, body: dict[str, Any]) -> Any:
        served = self.model(body)
        spec_name = served.kind if endpoint == "predict" else endpoint
        if endpoint == "predict" and served.kind == PRETRAINING:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"model {served.name!r} is a pretraining model; predict needs a "
                                                   "fine-tuned (classify, ner or qa) model")
        fields = _check_fields(body, FIELDS[spec_name])
        compute: dict[str, Callable[[], Any]] = {
            "fill-mask": lambda: inference.fill_mask(served, fields["text"], fields.get("top_k", 5)),
            "nsp": lambda: inference.next_sentence(served, fields["a"], fields["b"]),
            "attention": lambda: inference.attention(served, fields["text"], fields.get("text_b")),
            "predict": lambda: inference.predict(served, fields),
        }
        with served.lock:
            return compute[endpoint]()

    def run_info(self, name: str) -> dict[str, Any]:
        run = self.run(name)
        return {**run.describe(), "config": run.config(), "checkpoints": run.checkpoints()}

    def run(self, name: str) -> ServedRun:
        if name not in self.table.runs:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no run named {name!r}; this server has: "
                                                 f"{', '.join(self.table.runs) or 'none'}")
        return self.table.runs[name]

    def get(self, path: str) -> Any:
        if path == "/api/models":
            return [served.describe() for served in self.table.models.values()]
        if path == "/api/runs":
            return [run.describe() for run in self.table.runs.values()]
        parts = path.split("/")  # "", "api", "runs", NAME[, "metrics"]
        if len(parts) in (4, 5) and parts[:3] == ["", "api", "runs"]:
            name = unquote(parts[3])
            if len(parts) == 4:
                return self.run_info(name)
            if parts[4] == "metrics":
                return read_metrics(self.run(name).metrics_file)
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path}")


POST_ENDPOINTS = {f"/api/{name}": name for name in ("fill-mask", "nsp", "attention", "predict")}


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 plumbing: read the request, call the `Playground`, write JSON or a static file."""

    server: "PlaygroundServer"
    timeout = 60  # seconds a client may stall mid-request before its thread gives up on it

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the page shows errors; a terminal full of request lines hides the start-up message."""

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        body = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _answer(self, respond: Callable[[], Any]) -> None:
        try:
            self._json(HTTPStatus.OK, respond())
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc)})
        except BertforgeError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # a bug of ours: one line to the page and the terminal, the server stays up
            print(f"bertforge serve: internal error on {self.command} {self.path}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in self.server.playground.files:
            body, content_type = self.server.playground.files[path]
            self._send(HTTPStatus.OK, body, content_type)
            return
        self._answer(lambda: self.server.playground.get(path))

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._answer(self._post)

    def _post(self) -> Any:
        path = urlsplit(self.path).path
        if path not in POST_ENDPOINTS:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
        return self.server.playground.post(POST_ENDPOINTS[path], self._body())

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the request body is {length} bytes; the playground takes at most {MAX_BODY_BYTES}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the request body is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON ({exc.msg} at line "
                                                   f"{exc.lineno} column {exc.colno})") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object, e.g. "
                                                   '{"model": "NAME", "text": "..."}')
        return body


class PlaygroundServer(ThreadingHTTPServer):
    """A threading HTTP server that carries its `Playground`; request threads die with the server."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], playground: Playground) -> None:
        self.playground = playground
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"


def make_server(table: Table, host: str = "127.0.0.1", port: int = 8000) -> PlaygroundServer:
    """Bind (port 0: any free port) without serving yet; `serve_forever()` serves, `shutdown()` stops it."""
    try:
        return PlaygroundServer((host, port), Playground(table))
    except OSError as exc:
        raise BertforgeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or "
                             "--host") from None
