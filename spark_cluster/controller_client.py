"""The CLI's client of this cluster's running controller: `up` with a changed cluster.yaml sends
it there (POST /api/rollout, the bearer token) and reports the change's events as they come."""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from . import timeouts
from .config import ClusterConfig
from .errors import RolloutFailed

Report = Callable[[dict[str, Any]], None]


def through_controller(cfg: ClusterConfig, text: str, report: Report) -> Optional[bool]:
    """`up` while this cluster's controller serves: the change sent to it (POST /api/rollout) and its
    events reported as they come. None when no controller of this cluster answers."""
    import httpx

    from .controller import load_token

    url = cfg.controller_url()
    try:
        seen = httpx.get(f"{url}/healthz", timeout=timeouts.CONTROLLER_PROBE_S)
        if seen.json().get("cluster") != cfg.name:
            return None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    headers = {"Authorization": f"Bearer {load_token(cfg)}", "Content-Type": "application/yaml"}
    try:
        with httpx.stream("POST", f"{url}/api/rollout", content=text.encode(), headers=headers,
                          timeout=httpx.Timeout(timeouts.QUICK_S, read=None)) as r:
            if r.status_code != 200:
                r.read()
                raise RolloutFailed(f"the controller at {url} refuses the change: {_detail(r)}")
            for line in r.iter_lines():
                e = _event(line, url)
                if e is None:
                    continue
                if e.get("event") == "rollout-done":
                    return _done(e)
                report(e)
    except httpx.HTTPError as exc:
        raise RolloutFailed(f"the controller at {url} stopped answering during the change ({type(exc).__name__}); "
                            "its events say how far it went") from None
    raise RolloutFailed(f"the controller at {url} ended the change without saying how it went")


def _event(line: str, url: str) -> Optional[dict[str, Any]]:
    """One line of the controller's answer: an event; None for a blank line or JSON that is no event."""
    if not line.strip():
        return None
    try:
        e = json.loads(line)
    except ValueError:
        raise RolloutFailed(f"the controller at {url} sent a line that is not an event during the change; "
                            "its events say how far it went") from None
    return e if isinstance(e, dict) else None


def _detail(r: Any) -> str:
    try:
        return str(r.json().get("detail"))
    except ValueError:
        return f"HTTP {r.status_code}"


def _done(e: dict[str, Any]) -> bool:
    if not e.get("ok"):
        raise RolloutFailed("the rolling change stopped at a group that did not come back with the new config "
                            "(its events above say why); the groups after it keep what they run")
    return True
