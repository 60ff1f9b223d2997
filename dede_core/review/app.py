"""`dede review RUN`: a local web app over a finished run, where a person looks at what was flagged, queries it
and signs off keep/drop decisions that `dede clean --decisions` applies.

Safe by default: it binds 127.0.0.1 unless told otherwise; every request needs the random token printed at
start (the `X-Dede-Token` header; a GET may carry it as `?token=`, as Jupyter's links do, but a write must send the
header, which another web page cannot); a request whose Host header is not the app's own address is refused (DNS
rebinding); queries go through the read-only guard of `dede sql`; the only file written is
RUN/review/decisions.parquet; errors are JSON {"error": message}, never a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import socket
import threading
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from dede_core.review.projection import corpus_map
from dede_core.review.queries import MAX_ROWS, RunData, RunFolders, rows_json
from dede_core.review.store import DecisionStore

log = logging.getLogger("dede")
PAGE = os.path.join(os.path.dirname(__file__), "page.html")
TOKEN_HEADER = "x-dede-token"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers the app answers: its own address:port (and localhost's names for a loopback address);
    None (any) when it listens on every address, where only the token guards it."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {host}
    try:
        if ipaddress.ip_address(host).is_loopback:
            names |= {"127.0.0.1", "localhost", "[::1]"}
    except ValueError:
        pass
    if ":" in host and not host.startswith("["):
        names.add(f"[{host}]")
    return {f"{n}:{port}" for n in names}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(run: str | os.PathLike, *, token: str, host: str = "127.0.0.1", port: int = 8765) -> FastAPI:
    """The app over RUN, answering on host:port and to requests carrying `token`."""
    if not isinstance(token, str) or len(token) < 16:
        raise ValueError("the review token must be a random string of at least 16 characters")
    data = RunData(RunFolders.of(run))
    store = DecisionStore(data.f.run)
    hosts = allowed_hosts(host, port)
    app = FastAPI(title="dede review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.data, app.state.store = data, store
    map_lock, cached_map = threading.Lock(), {}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None and request.headers.get("host", "") not in hosts:
            return _error(403, f"Host {request.headers.get('host')!r} is not this app's address; open the URL "
                               f"`dede review` printed")
        sent = request.headers.get(TOKEN_HEADER)
        if sent is None and request.method not in WRITES:
            sent = request.query_params.get("token")
        if sent is None or not hmac.compare_digest(sent.encode(), token.encode()):
            why = ("a write needs the token in the X-Dede-Token header" if request.method in WRITES
                   else "missing or wrong token")
            return _error(401, f"{why}: open the URL `dede review` printed (it ends in ?token=...)")
        response = await call_next(request)
        response.headers.update({"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"})
        return response

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError):
        return _error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, f"bad request: {where}")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("dede review: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/api/summary")
    def summary() -> dict[str, Any]:
        return data.summary() | {"decisions": len(store.rows())}

    @app.get("/api/groups")
    def groups() -> dict[str, Any]:
        decided = store.by_key()
        out = []
        for g in data.groups:
            marks = [decided[k]["decision"] for k in data.members[g["id"]] if k in decided]
            out.append(g | {"keep": marks.count("keep"), "drop": marks.count("drop")})
        return {"grouped_by": data.grouped_by, "groups": out}

    @app.get("/api/group")
    def group(id: str, limit: int = 200) -> dict[str, Any]:
        if id not in data.members:
            raise HTTPException(404, f"no group {id!r}; GET /api/groups lists them")
        keys = data.members[id][:max(0, min(limit, MAX_ROWS))]
        thumbs, decided = data.thumbnail_uris(keys), store.by_key()
        info = next(g for g in data.groups if g["id"] == id)
        return info | {"members": [{"key": k, "thumbnail": thumbs[k],
                                    "decision": decided.get(k, {}).get("decision")} for k in keys]}

    @app.get("/api/flagged")
    def flagged(sort: str = "score", order: str = "desc", label: str | None = None, source: str | None = None,
                limit: int = MAX_ROWS) -> dict[str, Any]:
        table = data.flagged
        if sort not in table.column_names or order not in ("asc", "desc"):
            raise ValueError(f"sort must be one of {', '.join(table.column_names)} and order asc or desc")
        rows = table.sort_by([(sort, "ascending" if order == "asc" else "descending")])
        rows = rows_json(rows, table.num_rows)
        if label not in (None, ""):
            rows = [r for r in rows if str(r.get("label")) == label]
        if source not in (None, ""):
            rows = [r for r in rows if source.lower() in str(r.get("source") or "").lower()]
        decided = store.by_key()
        for r in rows:
            d = decided.get(r["key"])
            r["decision"], r["note"] = (d["decision"], d["note"]) if d else (None, None)
        return {"columns": table.column_names + ["decision", "note"], "rows": rows[:max(0, limit)],
                "total": len(rows)}

    @app.get("/api/map")
    def projection() -> dict[str, Any]:
        with map_lock:
            if not cached_map:
                cached_map.update(corpus_map(data.f.scores, set(data.flagged.column("key").to_pylist())))
        return cached_map

    @app.get("/api/thumb")
    def thumb(key: str) -> Response:
        found = data.thumbnails([key])[key]
        if found is None:
            raise HTTPException(404, f"no decodable image for key {key!r} in the shards")
        return Response(found[0], media_type=found[1])

    @app.post("/api/query")
    def query(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        sql = body.get("sql")
        if not isinstance(sql, str):
            raise ValueError('send {"sql": "SELECT ..."}')
        return data.query(sql)

    @app.get("/api/decisions")
    def decisions() -> dict[str, Any]:
        rows = [r | {"decided_at": r["decided_at"].isoformat()} for r in store.rows()]
        return {"path": store.path, "decisions": rows}

    @app.post("/api/decisions")
    def decide(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        decision, note, gid = body.get("decision"), body.get("note"), body.get("group")
        if gid is not None:
            if gid not in data.members:
                raise HTTPException(404, f"no group {gid!r}; GET /api/groups lists them")
            keys = data.members[gid]
        else:
            keys = body.get("keys")
            if not isinstance(keys, list):
                raise ValueError('send {"keys": [...]} or {"group": ID}, with "decision": "keep"|"drop" and a "note"')
        if decision == "undo":
            return {"forgotten": store.forget(keys)}
        return {"decided": store.decide(keys, decision, note, gid)}

    @app.get("/api/decisions/export")
    def export() -> Response:
        if not os.path.isfile(store.path):
            raise HTTPException(404, "no decisions yet: mark a sample or a group first")
        return FileResponse(store.path, media_type="application/vnd.apache.parquet", filename="decisions.parquet")

    return app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def url(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
    return f"http://{shown}:{port}/?token={token}"


def server(run: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
    """(a uvicorn.Server ready to .run() in this thread or another, its URL with the token)."""
    import uvicorn

    port = port or free_port(host)
    token = token or new_token()
    app = create_app(run, token=token, host=host, port=port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config), url(host, port, token)
