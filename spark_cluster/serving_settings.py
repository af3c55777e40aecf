"""The sections of cluster.yaml about what runs once the group is up: health probes, the
watchdog, the gateway, the controller and its API (spark_cluster.settings has the others).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .settings import Strict, size_text, parse_size


class HealthSettings(Strict):
    """Deadlines of `up` and of the probes."""

    ray_join_timeout_s: float = Field(300, gt=0, description="How long to wait for every node to join Ray.")
    ready_timeout_s: float = Field(1800, gt=0, description="How long the model may take to load until a real completion succeeds (loads take minutes on Sparks).")
    probe_timeout_s: float = Field(5, gt=0, description="Deadline of one HTTP probe.")
    completion_timeout_s: float = Field(60, gt=0, description="Deadline of the readiness completion.")
    poll_interval_s: float = Field(2, gt=0, description="Interval between polls of Ray's membership while `up` waits for the nodes to join (each poll imports Ray in the head container; vLLM's readiness is polled every 0.25 s).")


# vLLM's own deadline of one engine step across ranks (VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS' default)
VLLM_STEP_TIMEOUT_S = 300.0


class WatchdogSettings(Strict):
    """The failover controller (`spark-cluster watch`). Defaults: docs/failover.md, from docs/field.md."""

    period_s: float = Field(2, gt=0, description="Seconds between observations (one SSH command per node and two local HTTP requests).")
    stall_window_s: float = Field(
        10, gt=0, description="No progress this long while work is pending: a hang when a rank is seen stopped or spinning at near-idle "
        "power (confirmed at once), busy when every rank is seen working (up to busy_budget_s), else suspect until a canary decides. "
        "A loaded hang is confirmed in about 12-20 s: well before Ray's ~65 s dead-node timeout.",
    )
    canary_timeout_s: float = Field(5, gt=0, description="A suspect cluster is confirmed hung when a 1-token completion does not finish within this.")
    idle_canary_s: float = Field(30, gt=0, description="An idle engine (nothing in flight, no progress) gets a 1-token canary this often: a hang "
                                                       "nobody is waiting on yet is found within about this plus the canary deadline.")
    grace_after_start_s: float = Field(60, ge=0, description="No hang verdict this long after a (re)start became ready.")
    backoff_base_s: float = Field(10, ge=0, description="First restart backoff; doubles each consecutive restart (Kubernetes/GPUStack).")
    backoff_max_s: float = Field(300, ge=0, description="Cap of the restart backoff.")
    backoff_reset_s: float = Field(600, ge=0, description="Healthy this long resets the backoff.")
    max_restarts_per_hour: int = Field(3, ge=0, description="Circuit breaker: more restarts than this in an hour stop the watchdog (state failed).")
    enabled: bool = Field(True, description="Restart automatically (false: only observe and report).")
    member_wait_s: float = Field(300, ge=0, description="A node the last observation found silent (a cable pulled, a node rebooting) is "
                                                       "waited for this long before a restart starts: a restart without it fails at once and "
                                                       "counts against the breaker, the wait does not.")
    restart: Literal["auto", "full"] = Field(
        "auto", description="Which restart a hang gets. auto: when everything but the engine is seen sound (the Ray executor, every "
        "container running as planned, Ray showing every node alive), only the engine restarts: what is left of it is killed, Ray "
        "releases its ranks, and vllm serve starts again in the kept head container; on any doubt, and when that fails, the full "
        "restart. full: every container removed and created again, always.")
    busy_budget_s: Optional[float] = Field(
        None, gt=0, description="How long a step may run without progress while every rank is seen working (GPU power above its idle "
        "baseline, CPU ranks using CPU, a compile running) before the canary may confirm a hang. Default: the engine's own step "
        "timeout, VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS of the head's container environment, else vLLM's 300 s: past it vLLM fails the "
        "step itself.")


class GatewaySettings(Strict):
    """The gateway (`spark-cluster controller`): the OpenAI API (/v1/*) clients use instead of vLLM's
    port, hiding failover. It answers nothing else but `/health` (200 while it lets requests through)."""

    host: str = Field("0.0.0.0", description="Address the gateway listens on (clients).")
    port: int = Field(8080, ge=1, le=65535, description="Port clients use instead of vLLM's.")
    hold_s: float = Field(600, ge=0, description="How long a request may wait while the cluster is not serving (restarting, "
                                                 "backing off, starting, hang confirmed) before it gets 503 with Retry-After. "
                                                 "A restart on Sparks reloads the model: minutes.")
    max_held: int = Field(256, ge=0, description="Most requests held at once; past it new ones get 503 with Retry-After.")
    max_body: str = Field("32m", description="Largest request body accepted (413 above it), as a size.")
    connect_timeout_s: float = Field(5, gt=0, description="Deadline to connect to vLLM (a refused or late connection is retried while held).")
    read_timeout_s: float = Field(900, gt=0, description="Longest silence from vLLM within one answer (between two chunks of a stream, "
                                                         "or before a non-streamed answer) before the request fails.")
    max_connections: int = Field(1024, ge=1, description="Connections to vLLM at once (httpx's default 100 is a known failure of routers "
                                                         "with many concurrent streams).")
    retry_after_s: int = Field(30, ge=1, description="Retry-After of a 503 past hold_s or max_held.")
    max_attempts: int = Field(10, ge=1, description="Most times one request is sent to the engine (a retry happens only before any byte "
                                                    "reached the client); past it 503, whatever is left of hold_s.")
    drain_s: float = Field(300, gt=0, description="A rolling change (`up` with a changed config while the controller runs): how long a "
                                                   "group's requests in flight may take to finish before it is recreated; streams still "
                                                   "open then end with an error event.")
    continue_streams: bool = Field(True, description="A completion or chat stream cut by a hang, a restart or a rolling change is "
                                                      "continued from the exact token where it stopped (on another group at once, or "
                                                      "on this one once it serves again) instead of ending with an error event: the "
                                                      "gateway asks vLLM for the token ids (return_token_ids) and keeps them per stream.")
    continue_chat: bool = Field(True, description="Chat streams too, with vLLM's own reasoning and tool parsers: vLLM is started "
                                                  "with --enable-scale-out (vLLM 0.30 on), whose /v1/chat/completions/derender turns the "
                                                  "continuation's token ids into chat deltas. false for an older vLLM (its chat streams "
                                                  "then end with the error event when cut, as before).")
    continue_within_s: float = Field(900, gt=0, description="How long a cut stream is held open (SSE comment lines, so that proxies "
                                                            "and clients keep it) waiting for a group to continue it on. A restart "
                                                            "on Sparks takes minutes.")
    continue_attempts: int = Field(2, ge=1, description="Most continuations of one stream.")
    prefix_affinity: bool = Field(True, description="With several groups: requests whose prompt (or chat history) starts the same go "
                                                     "to the same group, where vLLM's prefix cache holds it, while its load allows.")
    affinity_bound: float = Field(1.25, ge=1, description="With prefix_affinity: a group takes a request for its cached prefix while it "
                                                          "would hold at most this times the mean of requests in flight; past it the least "
                                                          "loaded group does.")
    max_head: str = Field("64k", description="Largest request line and headers together, as a size (431 and the connection closed above it).")
    request_deadline_s: float = Field(60, gt=0, description="Longest time a client may take to send a whole request (head and body), from "
                                                            "its first byte (408 and the connection closed past it).")
    max_clients: int = Field(4096, ge=1, description="Most client connections open at once; past it a new one gets 503 and is closed "
                                                     "(the controller's unit raises its file limit above it).")
    max_clients_per_peer: int = Field(1024, ge=1, description="Most connections open at once from one client address; past it a new one "
                                                              "from there gets 503 and is closed (one client cannot fill max_clients). Raise "
                                                              "it when a proxy in front of the gateway is the one address it sees.")
    client_write_timeout_s: float = Field(60, gt=0, description="Longest time a client may leave its answer unread while the gateway "
                                                                "has more for it (its connection full); past it the client is cut, so "
                                                                "that a request nobody reads holds nothing at the engine or the gateway.")
    max_buffered: str = Field("256m", description="Request bodies held in memory at once, over every connection, as a size: past it the "
                                                  "gateway stops reading new bodies until earlier ones went to the engine.")

    @field_validator("max_body", "max_head", "max_buffered", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> str:
        return size_text(value)

    def max_body_bytes(self) -> int:
        return parse_size(self.max_body)

    def max_head_bytes(self) -> int:
        return parse_size(self.max_head)

    def max_buffered_bytes(self) -> int:
        return parse_size(self.max_buffered)


class ControllerSettings(Strict):
    """The controller's control plane: its API (/api), status page (/), Prometheus metrics (/metrics),
    incident bundles and API docs, on a port of their own, apart from the clients' gateway."""

    host: str = Field("127.0.0.1", description="Address the control plane listens on. The status page, events and incident bundles "
                                               "are readable by anyone who reaches it: from another machine use an SSH tunnel, or "
                                               "listen wider (0.0.0.0) only behind a firewall.")
    port: int = Field(8081, ge=1, le=65535, description="Port of the API, the status page and /metrics (what Prometheus scrapes).")
    allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Names and addresses clients reach the control plane by (its Host header), besides loopback, `host` and this machine's own "
        "name and addresses: another is refused with 400 (a web page of another site cannot read the status page through DNS rebinding)."))


class ApiSettings(Strict):
    """Who may act through the controller's API (POST /api/restart, /api/watchdog/pause|resume)."""

    token_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="Environment variable holding the API's bearer token.")
    token_file: Optional[str] = Field(None, description="File holding the API's bearer token (read at start). Default when neither is set: "
                                                        "state_dir/api-token, created with a random token (mode 600) on first start.")

    @model_validator(mode="after")
    def _one(self) -> "ApiSettings":
        if self.token_env and self.token_file:
            raise ValueError("give token_env or token_file, not both")
        return self


Severity = Literal["info", "warning", "critical"]


class NotifyTarget(Strict):
    """One place notifications go: an Apprise URL (Slack, Discord, ntfy, Telegram, e-mail, a JSON webhook, ...:
    https://github.com/caronc/apprise/wiki), read from a variable or a file when the controller starts; it is a secret
    (a webhook's URL is its key) and masked like every other."""

    url_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                   description="Environment variable holding the target's Apprise URL (e.g. `json://host:port/path`, "
                                               "`ntfys://topic`, `slack://T/B/C`).")
    url_file: Optional[str] = Field(None, description="File holding the target's Apprise URL (its first line).")
    min_severity: Optional[Severity] = Field(None, description="This target's own least severity (default: notify.min_severity).")

    @model_validator(mode="after")
    def _one(self) -> "NotifyTarget":
        if bool(self.url_env) == bool(self.url_file):
            raise ValueError("give url_env or url_file (exactly one)")
        return self


class NotifySettings(Strict):
    """Messages to the operator from the controller: a hang confirmed (with its evidence), a restart done or failed,
    the circuit breaker open, memory not given back, a configuration error the watchdog found, a group slow and back.
    Sent from threads of their own: a target that hangs or refuses never delays the watchdog or the gateway."""

    targets: list[NotifyTarget] = Field(default_factory=list, description="Where notifications go (none: nothing is sent).")
    min_severity: Severity = Field("info", description="The least severity sent: info (a restart done, a group back), warning "
                                                        "(memory not given back, a slow group), critical (a hang, a failed restart, "
                                                        "the breaker open).")
    per_kind: int = Field(3, ge=1, le=100, description="At most this many notifications of one kind for one group in `window_s`; "
                                                       "the others are counted and sent as one summary when the window ends (a "
                                                       "restart loop sends a few messages and a summary, not a flood).")
    window_s: float = Field(3600, ge=1, description="The window of `per_kind`.")
    queue: int = Field(100, ge=1, le=10000, description="Messages waiting for one target; one more is dropped, counted "
                                                        "(spark_cluster_notifications_total{outcome=\"dropped\"}) and logged.")
    timeout_s: float = Field(10, gt=0, le=300, description="The most one attempt to send one message may take.")
    attempts: int = Field(3, ge=1, le=10, description="Attempts per message and target, 2, 4, 8 ... s apart.")


class SlowSettings(Strict):
    """The slow-but-alive verdict (spark_cluster.speed): a group that serves, slower than it should."""

    enabled: bool = Field(True, description="Judge each group's decode speed (status, the page, /metrics, a notification, the "
                                            "gateway's share).")
    slower_by: float = Field(0.2, gt=0, le=10, description="How much slower than the fastest other group's time per token at that "
                                                          "load (serving alone: than its own, learned) makes a group slow (0.2: 20 %).")
    for_s: float = Field(20, ge=0, description="How long it must hold before the verdict (and its end) is said.")
    window_s: float = Field(30, ge=5, description="The time per token is the median of the watchdog's periods over this last window "
                                                 "(a change shows in it after half of it).")
    learn_windows: int = Field(5, ge=1, description="Windows at a load a group learns from before its own time is compared with.")
