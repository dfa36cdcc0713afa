"""`rlhf-dist label CONFIG`: the pairwise labelling page, served by FastAPI on uvicorn.

FastAPI/Starlette and uvicorn are maintained HTTP stacks (request parsing, cookies, keep-alive, a thread pool for
blocking handlers); the store's per-labeller files and locks do the rest. On 127.0.0.1 (the default) anyone on this
machine may label; on any other address every request must carry a token generated at start-up and printed once,
in the URL to open (the page then keeps it in an HttpOnly cookie). The access log is off, so no URL, and no token,
is ever logged.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path
from urllib.parse import urlencode

import pyarrow.parquet as pq
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from pydantic import BaseModel, Field

from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.data.labels import label_folder, read_judgements
from rlhf_dist.label.agreement import format_summary, summarize
from rlhf_dist.label.page import PAGE
from rlhf_dist.label.pairs import collected_path, read_collected
from rlhf_dist.label.store import LabelError, LabelStore

COOKIE = "rlhf_label_token"
ANY = ("0.0.0.0", "::")  # listen on every address
NEEDS_TOKEN = "this server needs its token: open the URL that `rlhf-dist label` printed when it started"


class Judgement(BaseModel):
    labeller: str
    pair_id: int
    choice: str
    note: str | None = Field(default=None, max_length=4000)


class Undo(BaseModel):
    labeller: str


def needs_token(host: str) -> bool:
    """Every address but loopback needs the token (0.0.0.0 and :: listen on all of them)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return True


def create_app(store: LabelStore, token: str | None = None) -> FastAPI:
    app = FastAPI(title="rlhf-dist label", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        given = request.query_params.get("token")
        if request.url.path == "/" and given is not None:
            if not secrets.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse("wrong token; " + NEEDS_TOKEN, status_code=403)
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse("/" + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        auth = request.headers.get("authorization", "")
        given = request.cookies.get(COOKIE) or (auth[7:] if auth.lower().startswith("bearer ") else None)
        if given is None or not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": NEEDS_TOKEN}, status_code=401)
        return await call_next(request)

    @app.exception_handler(LabelError)
    async def label_error(request: Request, err: LabelError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/next")
    def next_pair(labeller: str) -> dict:
        return store.next_pair(labeller)

    @app.post("/api/judge")
    def judge(j: Judgement) -> dict:
        return store.judge(j.labeller, j.pair_id, j.choice, j.note)

    @app.post("/api/undo")
    def undo(u: Undo) -> dict:
        return store.undo(u.labeller)

    @app.get("/api/summary")
    def summary() -> dict:
        return store.summary()

    return app


def open_store(cfg: RunConfig) -> LabelStore:
    """The store over label.output with the configured pairs; a missing pairs file is one ConfigError line."""
    c, folder = cfg.label, label_folder(cfg)
    policy = cfg.collect.policy or cfg.model.policy
    sampler, pairs = None, []
    if c.pairs == "collect":
        pairs = read_collected(collected_path(cfg))
    else:
        from rlhf_dist.label.sampler import PairSampler  # deferred: label

        sampler = PairSampler(cfg, folder)
        pairs = sampler.existing()
    return LabelStore(
        folder,
        pairs,
        overlap=c.overlap,
        seed=cfg.seed,
        policy=policy,
        synthetic=cfg.data.task == "synthetic",
        sampler=sampler,
        low_water=c.sample_prompts // 2,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog from now on, before uvicorn takes over the socket
    except OSError as err:
        sock.close()
        raise ConfigError(
            "label.port", f"cannot listen on {host}:{port} ({err.strerror}); choose another port"
        ) from None
    return sock


def serve(cfg: RunConfig) -> int:
    c = cfg.label
    store = open_store(cfg)
    try:
        token = secrets.token_urlsafe(24) if needs_token(c.host) else None
        sock = bind(c.host, c.port)
        port = sock.getsockname()[1]
        host = f"[{c.host}]" if ":" in c.host else c.host
        source = str(collected_path(cfg)) if c.pairs == "collect" else f"sampled from {store.policy}"
        print(f"rlhf-dist label: {len(store.pairs)} pairs ({source}); judgements go to {store.folder}", flush=True)
        url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
        anywhere = " (from another machine: this machine's address in place of the host)" if c.host in ANY else ""
        print(f"rlhf-dist label: open {url}{anywhere}", flush=True)
        if token:
            print("rlhf-dist label: the token is printed only here; without it every request is refused", flush=True)
        config = uvicorn.Config(create_app(store, token), log_level="warning", access_log=False, log_config=None)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down, then re-raises the Ctrl-C: the normal way to stop labelling
            pass
    finally:
        store.close()
    print(format_summary(store.summary()), flush=True)
    return 0


def summary(cfg: RunConfig) -> int:
    """Prints the summary of the judgements on disk (the server may be running)."""
    folder = label_folder(cfg)
    if not Path(folder).is_dir():
        raise ConfigError(
            "label.output", f"{str(folder)!r} does not exist; nothing is labelled yet (`rlhf-dist label`)"
        )
    total = None
    if cfg.label.pairs == "collect" and collected_path(cfg).exists():
        total = len(read_collected(collected_path(cfg)))
    elif cfg.label.pairs == "sample":  # the pairs sampled so far
        total = sum(
            pq.ParquetFile(f).metadata.num_rows for f in sorted((Path(folder) / "pairs").glob("part-*.parquet"))
        )
    print(format_summary(summarize(read_judgements(folder), total, cfg.data.task == "synthetic")), flush=True)
    return 0
