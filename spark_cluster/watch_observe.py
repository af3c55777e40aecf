"""The watchdog's eyes: one observation of a group per period (each node's script, the engine's API,
Ray's membership in the background), reduced to the decision's Sample, and what they learn over
time (each node's last processes, the GPUs' idle and busy power). What they knew goes into an
incident bundle (`known`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Optional

import httpx

from . import kept, timeouts
from .config import ClusterConfig
from .decide import Sample
from .judge import sample_of
from .observation import NodeObs, RayObs
from .observe import Engine, group_containers, observe_node, observe_ray
from .plan import build_plan
from .ranks import GpuBaseline, ProcessesReading, learn_baseline
from .transport import Nodes


class Eyes:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, baselines: dict[str, GpuBaseline],
                 in_flight: Callable[[], int], http: Optional[httpx.Client]):
        self.cfg, self.nodes, self.in_flight = cfg, nodes, in_flight
        self.plan = build_plan(cfg, links=kept.links(cfg), kv=kept.kv_capacity(cfg))
        self.expected_nodes = {n.name: n.address for n in cfg.nodes}
        self.ray_step = next((s for s in self.plan.steps if s.kind == "wait-ray"), None)
        # Ray's membership is asked in the background (importing Ray costs a second or two of CPU on
        # the head): at most one probe in flight, started at most every timeouts.RAY_PROBE_INTERVAL_S
        self.ray_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-probe")
        self.ray_probe: Optional[Future[RayObs]] = None
        self.ray_probe_started = float("-inf")
        self.last_ray: Optional[RayObs] = None  # the last answer of a Ray probe (for incident bundles)
        self.gpu_baseline = baselines
        self.samples: deque[dict[str, Any]] = deque(maxlen=60)
        self.canary_result: Optional[tuple[Optional[bool], float, Optional[int]]] = None  # handed on by the next observation
        self.containers = {n.name: group_containers(self.plan, n.name) for n in cfg.nodes}
        self.last_nodes: list[NodeObs] = []
        self.last_procs: dict[str, ProcessesReading] = {}  # each node's last reading of its processes (CPU between two)
        self.engine = Engine(cfg, http)
        # each node's script runs in a thread of its own; a node silent last time is waited for one period
        # at most (its connect timeout would hold every period back), its attempt going on in the background
        self.node_pool = ThreadPoolExecutor(max_workers=len(cfg.nodes), thread_name_prefix="observe")
        self.asking: dict[str, Future[NodeObs]] = {}

    def observe(self, now: float) -> Sample:
        """One period's observation (never raises)."""
        cfg = self.cfg
        t_probe = cfg.health.probe_timeout_s
        silent = {n.name for n in self.last_nodes if not n.reachable}
        for n in cfg.nodes:  # the engine is asked meanwhile
            if n.name not in self.asking:
                self.asking[n.name] = self.node_pool.submit(observe_node, self.nodes[n.name], cfg, self.plan, t_probe + timeouts.NODE_PROBE_EXTRA_S)
        vllm = self.engine.sample(t_probe)
        nodes = [self._answer(n.name, n.role, cfg.watchdog.period_s if n.name in silent else None) for n in cfg.nodes]
        canary, self.canary_result = self.canary_result, None
        self.last_nodes = nodes
        self._ranks(nodes)
        sample = sample_of(nodes, self._ray_obs(), vllm, self.expected_nodes, now, canary, self.in_flight())
        self.samples.append(dataclasses.asdict(sample))
        return sample

    def _answer(self, name: str, role: str, wait_s: Optional[float]) -> NodeObs:
        """A node's observation, waited for (wait_s: at most that long; then it is still silent, asked on)."""
        try:
            obs = self.asking[name].result(timeout=wait_s)
        except FutureTimeout:
            return NodeObs(name=name, role=role, reachable=False, error=f"still no answer after {wait_s:g}s (asked on in the background)")
        del self.asking[name]
        return obs

    def _ranks(self, nodes: list[NodeObs]) -> None:
        """Each node's rank activity, from its processes against their last reading and its GPUs."""
        for n in nodes:
            n.judge_ranks(self.containers[n.name], self.last_procs.get(n.name), self.gpu_baseline.get(n.name, GpuBaseline()))
            if n._procs is not None:
                self.last_procs[n.name] = n._procs
            else:
                self.last_procs.pop(n.name, None)

    def learn(self, sample: Sample, moved: bool) -> None:
        """The GPUs' idle power while the engine is ready with nothing to do, their busy power while it
        progresses (the caller asks only while the group is healthy)."""
        idle = sample.health == 200 and not sample.pending and not moved
        working = moved and sample.pending > 0
        for n in self.last_nodes:
            self.gpu_baseline[n.name] = learn_baseline(self.gpu_baseline.get(n.name, GpuBaseline()), n.gpu_power_w,
                                                       idle=idle, working=working)

    def _ray_obs(self) -> RayObs:
        """The answer of the last finished Ray probe (then a new one starts), or not checked yet."""
        if self.ray_step is None:
            return RayObs()
        ray = RayObs()
        if self.ray_probe is not None and self.ray_probe.done():
            ray = self.last_ray = self.ray_probe.result()
            self.ray_probe = None
        if self.ray_probe is None and time.monotonic() - self.ray_probe_started >= timeouts.RAY_PROBE_INTERVAL_S:
            self.ray_probe_started = time.monotonic()
            self.ray_probe = self.ray_pool.submit(observe_ray, self.nodes[self.cfg.head.name], self.cfg, self.plan,
                                                  max(self.cfg.health.probe_timeout_s, timeouts.QUICK_S))
        return ray

    def new_generation(self) -> None:
        """The group was restarted: an answer about the previous generation is no news about this one."""
        self.ray_probe = None
        self.last_ray = None

    def known(self) -> dict[str, str]:
        """What they knew, as an incident bundle's files: the observations, the last metrics, Ray's
        state as the last probe saw it, the ranks."""
        files = {"observations.jsonl": "".join(json.dumps(x) + "\n" for x in self.samples),
                 "metrics.txt": self.engine.last_metrics_text}
        if self.last_ray is not None:
            files["ray-state.json"] = self.last_ray.model_dump_json(indent=1) + "\n"
        ranks = {n.name: {"activity": n.activity, "evidence": n.activity_evidence, "gpu_power_w": n.gpu_power_w,
                          "gpu_memory_util": n.gpu_memory_util, "gpu_baseline": dataclasses.asdict(self.gpu_baseline.get(n.name, GpuBaseline()))}
                 for n in self.last_nodes}
        files["ranks.json"] = json.dumps(ranks, indent=1) + "\n"
        return files

    def close(self) -> None:
        self.engine.close()
        self.ray_pool.shutdown(wait=False, cancel_futures=True)
        self.node_pool.shutdown(wait=False, cancel_futures=True)
