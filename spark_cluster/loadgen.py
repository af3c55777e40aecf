"""A small, bounded streaming load for tests and benchmarks (traffic to the cluster's endpoint only)."""

from __future__ import annotations

import threading
import time

import httpx


def stream_load(url: str, model: str, n: int, stop: threading.Event, *, max_tokens: int = 1500,
                repeat: bool = False, read_timeout_s: float = 240) -> list[threading.Thread]:
    """Start n long streaming completions in daemon threads; they end on `stop`. With repeat, each
    stream is sent again when it ends (continuous load). Every request has a deadline."""

    def one() -> None:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        while not stop.is_set():
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=read_timeout_s)) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            return
            except httpx.HTTPError:
                time.sleep(1)
            if not repeat:
                return

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads
