"""The controller's control plane (`controller.port`): FastAPI routes over a Controller.

Reading: /healthz, /api/status, /api/samples, /metrics, / (the status page). With the token (a
bearer header, or the status page's session from POST /api/session): /api/events, /api/incidents
and /incidents/ (the bundles' files). With the token as a bearer header only: restart and
pause/resume. Requests whose Host is not one of the controller's names get 400 (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.staticfiles import StaticFiles

from . import timeouts
from .config import WILDCARD_HOSTS, ClusterConfig, parse_config
from .errors import ConfigError
from .masking import mask
from .watch_state import iso
from .controller import EVENTS_KEPT, SESSION_COOKIE, TOKEN_NEEDED, Controller, listening_socket
from .state_dir import private_dir
from .render import render
from .control_guard import uvicorn_options
from .decide import request_refused


def create_app(ctl: Controller) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await ctl.start()
        try:
            yield
        finally:
            await ctl.stop()

    app = FastAPI(title=f"spark-cluster controller: {ctl.cfg.name}", lifespan=lifespan,
                  description="The control plane: the cluster's status and events, restart and pause/resume of the watchdog "
                              "(bearer token), Prometheus metrics. Clients use the gateway on gateway.port (vLLM's OpenAI API "
                              "at /v1/*, passed through unchanged, hiding failover).")
    app.include_router(_reading_routes(ctl))
    app.include_router(_private_routes(ctl))
    app.include_router(_session_route(ctl))
    app.include_router(_action_routes(ctl))
    app.include_router(_rollout_route(ctl))
    page = render("status-page.html", cluster=ctl.cfg.name)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page)

    for label, group in ctl.groups.items():  # with groups, /incidents/<group>/<bundle>/<file>
        incidents = StaticFiles(directory=group.resolved_state_dir() / "incidents", check_dir=False)
        app.mount(f"/incidents/{label}" if ctl.several else "/incidents", _guarded(ctl, incidents),
                  name=f"incidents-{label}")
    allowed = allowed_hosts(ctl.cfg)
    return _host_checked(app, allowed)


def allowed_hosts(cfg: ClusterConfig) -> set[str]:
    """The Host names the control plane answers to: loopback, its own address, this machine's name
    and addresses, and controller.allowed_hosts."""
    names = {"localhost", "127.0.0.1", "::1", *cfg.controller.allowed_hosts}
    if cfg.controller.host not in WILDCARD_HOSTS:
        names.add(cfg.controller.host)
    for name in {socket.gethostname(), socket.getfqdn()}:
        names.add(name)
        try:
            names.update(str(info[4][0]) for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return {n.lower() for n in names}


def host_of(header: str) -> str:
    """The host of a Host header, without its port (an IPv6 literal without its brackets). Pure."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _host_checked(app: Any, allowed: set[str]) -> Any:
    """Requests whose Host is not one of `allowed` get 400 (DNS rebinding)."""
    async def checked(scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_of(host) not in allowed:
                await JSONResponse({"detail": f"unknown host {host!r}: add it to controller.allowed_hosts"}, 400)(scope, receive, send)
                return
        await app(scope, receive, send)
    checked.app = app  # type: ignore[attr-defined]
    return checked


def _guarded(ctl: Controller, app: Any) -> Any:
    """An ASGI app answered only with the token (401 otherwise)."""
    async def guarded(scope, receive, send):
        if scope["type"] == "http" and not ctl.token_ok(request := Request(scope)):
            await _failed_attempt(ctl, _presented(request))
            await _unauthorized()(scope, receive, send)
            return
        await app(scope, receive, send)
    return guarded


def _presented(request: Request) -> bool:
    """The request carries a token or a session (a wrong one is an attempt; none is a page not logged in)."""
    return "authorization" in request.headers or SESSION_COOKIE in request.cookies


async def _failed_attempt(ctl: Controller, attempted: bool) -> None:
    """A wrong token waits timeouts.FAILED_TOKEN_S, one after the other whoever sends them: guesses go at
    that pace at most (the right token never waits)."""
    if attempted:
        async with ctl.guesses:
            await asyncio.sleep(timeouts.FAILED_TOKEN_S)


def _unauthorized() -> JSONResponse:
    return JSONResponse({"detail": TOKEN_NEEDED}, 401, headers={"WWW-Authenticate": "Bearer"})


def _reading_routes(ctl: Controller) -> APIRouter:
    """What the controller knows: its own health, the status, events, samples, incidents, metrics."""
    api = APIRouter()

    @api.get("/healthz", summary="The controller itself (not the engine)")
    def healthz():
        alive = ctl.watching()
        body = {"controller": "ok" if alive else "watchdog stopped", "cluster": ctl.cfg.name, **ctl.watchdog_json()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @api.get("/api/status", summary="The same JSON as `spark-cluster status --json`, plus the controller's view")
    def api_status():
        return {**ctl.status_json(), "controller": ctl.watchdog_json()}

    @api.get("/api/samples", summary="The watchdog's last observations (counters, running, waiting), oldest first")
    def api_samples():
        if ctl.several:
            return {label: list(wd.samples) for label, wd in ctl.wds.items()}
        return list(ctl.wd.samples) if ctl.wd else []

    @api.get("/metrics", summary="Prometheus metrics")
    def metrics():
        return Response(ctl.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return api


async def _event_stream(ctl: Controller, last: list[dict]):
    """Server-sent events: the last ones, then each as it happens (a keep-alive comment meanwhile)."""
    q: asyncio.Queue = asyncio.Queue()
    ctl.subscribers.add(q)
    try:
        for e in last:
            yield f"data: {json.dumps(e, default=str)}\n\n"
        while not ctl.stopping.is_set():
            try:
                e = await asyncio.wait_for(q.get(), timeout=timeouts.EVENT_STREAM_KEEP_ALIVE_S)
                yield f"data: {json.dumps(e, default=str)}\n\n"
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
    finally:
        ctl.subscribers.discard(q)


def _private_routes(ctl: Controller) -> APIRouter:
    """What a cluster did (events, incidents: reasons, logs): the token, as a bearer header or the
    session the status page opens with it."""

    async def authorized(request: Request) -> None:
        if not ctl.token_ok(request):
            await _failed_attempt(ctl, _presented(request))
            raise HTTPException(401, TOKEN_NEEDED, headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(dependencies=[Depends(authorized)])

    @api.get("/api/events", summary="The watchdog's events: the last n as JSON, or a server-sent event stream "
                                    "(Accept: text/event-stream) that starts with them")
    async def api_events(request: Request, n: int = Query(100, ge=0, le=EVENTS_KEPT)):
        last = list(ctl.events)[-n:] if n else []
        if "text/event-stream" not in request.headers.get("accept", ""):
            return last
        return StreamingResponse(_event_stream(ctl, last), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/api/incidents", summary="The last incident bundles and their files (served under /incidents/)")
    def api_incidents(n: int = Query(10, ge=1, le=100)):
        return ctl.incidents(n)

    return api


def _session_route(ctl: Controller) -> APIRouter:
    api = APIRouter()

    @api.post("/api/session", status_code=204, summary="The status page gives the token once; a session cookie (HttpOnly, "
                                                     "SameSite=Strict) lets it read events and incidents")
    async def api_session(body: dict[str, str] = Body(...)):
        given = str(body.get("token", ""))
        if not hmac.compare_digest(given.encode(), ctl.token.encode()):
            await _failed_attempt(ctl, True)
            raise HTTPException(401, TOKEN_NEEDED)
        resp = Response(status_code=204)
        resp.set_cookie(SESSION_COOKIE, ctl.session, httponly=True, samesite="strict", path="/")
        return resp

    return api


def _bearer_only(ctl: Controller) -> Callable[..., None]:
    """A dependency that lets through only the token as a bearer header."""
    bearer = HTTPBearer(auto_error=False)

    async def authorized(request: Request, creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), ctl.token.encode()):
            await _failed_attempt(ctl, _presented(request))
            raise HTTPException(401, TOKEN_NEEDED, headers={"WWW-Authenticate": "Bearer"})
    return authorized


def _rollout_route(ctl: Controller) -> APIRouter:
    """A rolling change (spark_cluster.rollout), as `up` asks for it while the controller serves."""
    api = APIRouter(dependencies=[Depends(_bearer_only(ctl))])

    @api.post("/api/rollout", summary="A rolling change to the cluster.yaml sent as the body, one group at a time (bearer "
                                      "token); the answer is its events as JSON lines, the last one rollout-done")
    async def api_rollout(request: Request):
        text = (await request.body()).decode("utf-8", "replace")
        try:
            new = parse_config(text, source="the config sent")
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        why = ctl.change_refused(new)
        if why:
            raise HTTPException(409, why)
        later = ctl.restart_needed_for(new)
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(e: dict) -> None:
            e = json.loads(mask(json.dumps(e, default=str), ctl.secrets))
            q.put_nowait(e)
            if e.get("event", "").startswith("roll-"):
                ctl.record({"ts": iso(time.time()), "cluster": ctl.cfg.name, **e})

        def report(e: dict) -> None:  # also from the executor's thread
            loop.call_soon_threadsafe(deliver, e)

        async def roll() -> None:  # a task of its own: the change goes on when the client leaves
            try:
                ok = await ctl.roll_out(new, report)
            except Exception as exc:  # noqa: BLE001 - said in the last line instead
                deliver({"event": "roll-failed", "error": f"{type(exc).__name__}: {exc}"})
                ok = False
            loop.call_soon(q.put_nowait, {"event": "rollout-done", "ok": ok, "restart_controller_for": later})

        ctl.tasks.add(task := asyncio.create_task(roll()))
        task.add_done_callback(ctl.tasks.discard)

        async def lines():
            while True:
                e = await q.get()
                yield json.dumps(e) + "\n"
                if e["event"] == "rollout-done":
                    return

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return api


def _action_routes(ctl: Controller) -> APIRouter:
    """What changes the cluster: restart, pause, resume; each needs the bearer token (in the header:
    the status page's session does not act)."""
    api = APIRouter(dependencies=[Depends(_bearer_only(ctl))])

    def watchdogs(group: Optional[str], every: bool) -> list[Any]:
        """The watchdogs a request names: `group`, else the only one (every one when `every`)."""
        if group is not None and group not in ctl.wds:
            raise HTTPException(404, f"no group {group!r} (groups: {', '.join(ctl.wds)})")
        if group is None and len(ctl.wds) > 1 and not every:
            raise HTTPException(400, f"name the group to restart: ?group= one of {', '.join(ctl.wds)}")
        return [ctl.wds[group]] if group is not None else list(ctl.wds.values())

    @api.post("/api/restart", status_code=202, summary="Restart a whole group in order now (bearer token; ?group= with groups)")
    def api_restart(group: Optional[str] = Query(None)):
        [wd] = watchdogs(group, every=False)
        if wd.busy_restarting:
            raise HTTPException(409, "a restart is already under way")
        refused = request_refused(wd.state, wd.clock(), ctl.cfg.watchdog)
        if refused is not None:
            raise HTTPException(429, refused)
        wd.request_restart("requested through the controller's API")
        return {"restart": "requested"}

    @api.post("/api/watchdog/pause", summary="Observe only: no automatic restart (bearer token; every group, or ?group=)")
    def api_pause(group: Optional[str] = Query(None)):
        for wd in watchdogs(group, every=True):
            wd.pause(True)
        return {"watchdog": "pausing"}

    @api.post("/api/watchdog/resume", summary="Restart automatically again (bearer token; every group, or ?group=)")
    def api_resume(group: Optional[str] = Query(None)):
        for wd in watchdogs(group, every=True):
            wd.pause(False)
        return {"watchdog": "resuming"}

    return api


def serve(cfg: ClusterConfig) -> None:
    """Run the controller until SIGINT/SIGTERM (uvicorn handles both): the control plane on uvicorn,
    the gateway started and stopped by its lifespan, both on one uvloop event loop."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for chatty in ("httpx", "httpcore"):  # one line per watchdog probe (every period) would bury what matters
        logging.getLogger(chatty).setLevel(logging.WARNING)
    gateway = listening_socket(cfg.gateway.host, cfg.gateway.port, "gateway.host/gateway.port")
    control = listening_socket(cfg.controller.host, cfg.controller.port, "controller.host/controller.port")
    ctl = Controller(cfg, gateway_socket=gateway)
    for group in ctl.groups.values():
        private_dir(group.resolved_state_dir() / "incidents")
    # uvloop named: a missing one stops the controller at start instead of falling back silently to asyncio's slower loop
    uvicorn.Server(uvicorn.Config(create_app(ctl), loop="uvloop", log_level="warning", access_log=False,
                                  timeout_graceful_shutdown=timeouts.GRACEFUL_SHUTDOWN_S,
                                  **uvicorn_options(cfg.gateway.max_head_bytes()))).run(sockets=[control])
