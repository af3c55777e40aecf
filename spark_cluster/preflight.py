"""`up`'s preflight and `doctor`: every check on every node at once, nothing changed but a
missing image fetched; the findings judged by spark_cluster.checks.evaluate.

With `nccl: auto` the link each node shows is remembered and the plan rebuilt with it before the
checks are judged (Preflight.plan is then the plan `up` goes on with). The vLLM flags check runs
last, in a throwaway container of the image on the head, skipped when the same image and flags
passed before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import kept, lifecycle, timeouts
from .box_checks import GdrCapable, MemoryCeiling
from .checks import (
    STATE_MIN_GIB,
    Check,
    ClusterLink,
    GpuWorks,
    ImagePlatform,
    ImagePresent,
    LinkBandwidth,
    PerftestPresent,
    RdmaBandwidth,
    VllmFlags,
    differs,
    evaluate,
    link_of,
    note,
    state_dir_problem,
    warning,
)
from .config import ClusterConfig
from .errors import CommandTimeout, VllmCheckError
from .facts import ContainerFact
from .link import LinkPick
from .model_sync import node_to_node
from .observe import list_containers
from .plan import build_plan
from .render import quote, read_template
from .steps import Plan, Step
from .transport import Nodes, Result, SSHTransport
from .vllm_check import VllmCheck, argv_hash, parse_output

Emit = Callable[..., None]  # Executor.emit: (event, step=None, **data)


@dataclass(frozen=True)
class Finding:
    """One preflight check's verdict on one node (node None: across nodes)."""

    node: Optional[str]
    check: str
    description: str
    problem: Optional[str] = None  # `up` refuses to start
    note: Optional[str] = None
    warning: Optional[str] = None  # said, and `up` goes on

    @property
    def message(self) -> str:
        return f"{self.node}: {self.problem}" if self.node else str(self.problem)


class Preflight:
    def __init__(self, cfg: ClusterConfig, nodes: Nodes, plan: Plan, emit: Emit):
        self.cfg = cfg
        self.nodes = nodes
        self.plan = plan  # rebuilt when `nccl: auto` detects the link
        self.emit = emit
        self.page_cache_counted = False  # `doctor`: the page cache `up` drops first is still held

    def inspect(self, existing: dict[str, list[ContainerFact]], *, fetch_images: bool = True, probes: bool = True) -> list[Finding]:
        """Every preflight check on every node (in parallel; nothing changed except, with fetch_images,
        the image pulled or streamed to a node that lacks it), as findings. With `nccl: auto` the link
        found is remembered and the plan rebuilt with it before the checks are judged. probes: the
        throwaway containers measuring the GPU from the image too (not on the watchdog's restart)."""
        left_out = (VllmFlags, LinkBandwidth, RdmaBandwidth) + (() if probes else (MemoryCeiling, GdrCapable))
        steps = [s for s in self.plan.steps_in("preflight") if not isinstance(s.check, left_out)]
        vllm_step = next((s for s in self.plan.steps_in("preflight") if isinstance(s.check, VllmFlags)), None)
        by_node: dict[str, list[Step]] = {}
        for s in steps:
            by_node.setdefault(s.node, []).append(s)
        for s in steps:
            self.emit("step-start", s)

        def run_node(t: SSHTransport) -> dict[str, Result]:
            return {s.id: t.run(s.command, timeout=s.timeout_s) for s in by_node[t.node]}

        results = self.nodes.map(run_node, by_node.keys())  # a bug raises: never "nothing was changed"
        outputs: dict[str, dict[str, Result]] = results.succeeded
        if fetch_images:
            self._fetch_missing_images(outputs, by_node)
        findings = [Finding(node, "ssh", "the node answers over SSH", str(exc)) for node, exc in results.failed.items()]
        state = self.cfg.resolved_state_dir()
        free = _free_gib(state)
        room = state_dir_problem(str(state), free)
        findings.append(Finding("controller", "state-dir", f"room for state_dir ({STATE_MIN_GIB:g} GiB)", room,
                                None if room else f"{free:.0f} GiB free"))
        self._detected_link(outputs)
        checks = {s.id: s.check.model_copy(update={"page_cache_counted": True}) if self.page_cache_counted and isinstance(s.check, MemoryCeiling)
                  else s.check for s in self.plan.steps_in("preflight")}  # judged by the plan as detected
        running_here = {n: any(c.running for c in cs) for n, cs in existing.items()}
        same: dict[str, tuple[Check, dict[str, str]]] = {}
        for node, res in outputs.items():
            for s in by_node[node]:
                r, check = res[s.id], checks[s.id]
                problem = evaluate(check, r.exit_code, r.stdout, r.stderr, cluster_running=running_here.get(node, False))
                findings.append(Finding(node, s.id, s.description, problem, None if problem else note(check, r.stdout, r.exit_code, r.stderr),
                                        None if problem else warning(check, r.exit_code, r.stdout, r.stderr)))
                if not problem and check.same_on_all_nodes:
                    same.setdefault(check.kind, (check, {}))[1][node] = r.stdout
        for check, values in same.values():
            problem = differs(check, values, self.cfg.head.name)
            if problem:
                findings.append(Finding(None, f"same/{check.kind}", f"{check.kind}: the same on every node", problem))
        bad = any(f.problem for f in findings)
        for s in steps:
            if s.node in outputs:
                self.emit("step-ok" if not bad else "step-checked", s, duration_s=round(outputs[s.node][s.id].duration_s, 3))
        if not bad:  # every node at once, with the plan as detected (its NCCL variables)
            perftest = [outputs[s.node][s.id].stdout.strip() for s in steps if isinstance(s.check, PerftestPresent) and s.node in outputs]
            rdma = perftest and all(perftest) and any(isinstance(s.check, RdmaBandwidth) for s in self.plan.steps_in("preflight"))
            findings += self._bandwidth_findings(RdmaBandwidth if rdma else LinkBandwidth)
        if vllm_step is not None:
            findings += self._vllm_findings(vllm_step, outputs, steps)
        return findings

    def _bandwidth_findings(self, kind: type) -> list[Finding]:
        """link.check bandwidth: ib_write_bw per rail when every node has it, else the all-reduce; every node at once."""
        steps = {s.node: s for s in self.plan.steps_in("preflight") if isinstance(s.check, kind)}
        if not steps:
            return []
        for s in steps.values():
            self.emit("step-start", s)
        results = self.nodes.map(lambda t: t.run(steps[t.node].command, timeout=steps[t.node].timeout_s,
                                                 input=read_template(steps[t.node].stdin).encode() if steps[t.node].stdin else None),
                                 steps.keys())
        findings = [Finding(node, steps[node].id, steps[node].description, str(exc)) for node, exc in results.failed.items()]
        for node, r in results.succeeded.items():
            s = steps[node]
            problem = evaluate(s.check, r.exit_code, r.stdout, r.stderr)
            found = None if problem else note(s.check, r.stdout)
            findings.append(Finding(node, s.id, s.description, problem, found))
            self.emit("step-failed" if problem else "step-ok", s, duration_s=round(r.duration_s, 3), note=found)
        return findings

    def doctor(self) -> list[Finding]:
        """Every preflight check, changing nothing (no image fetched, no page cache dropped, no lock
        taken): what `up` would find. A node that cannot be reached is a finding, not an error."""
        if self.cfg.memory.drop_page_cache:  # read memory as it is; up drops the page cache first
            cfg = self.cfg.model_copy(update={"memory": self.cfg.memory.model_copy(update={"drop_page_cache": False})})
            links = kept.links(cfg)
            self.plan = build_plan(cfg, reveal_secrets=True, links=links, kv=kept.kv_capacity(cfg))
            self.page_cache_counted = True  # CUDA's free on a GB10 counts the page cache up drops first
        existing = self.nodes.map(lambda t: list_containers(t, self.cfg.name)).succeeded
        return self.inspect(existing, fetch_images=False)

    def _detected_link(self, outputs: dict[str, dict[str, Result]]) -> None:
        """`nccl: auto`: the link each node's output shows; when every node has one, it is remembered
        (state_dir/link.json) and the plan rebuilt with it (its containers' NCCL/Gloo variables)."""
        picks: dict[str, LinkPick] = {}
        for s in self.plan.steps_in("preflight"):
            if isinstance(s.check, ClusterLink) and s.node in outputs:
                pick = link_of(s.check, outputs[s.node][s.id].stdout)
                if not isinstance(pick, LinkPick):
                    return  # judged with the other checks
                picks[s.node] = pick
        auto = [n.name for n in self.cfg.nodes if self.cfg.node_nccl(n).auto]
        if not auto or set(picks) != set(auto):
            return
        kept.save_links(self.cfg, picks)
        self.plan = build_plan(self.cfg, reveal_secrets=True, links=picks, kv=kept.kv_capacity(self.cfg))
        self.emit("link-detected", nodes={n: p.env() | ({"note": p.note} if p.note else {}) for n, p in picks.items()})

    def _vllm_findings(self, vllm_step: Step, outputs: dict[str, dict[str, Result]], steps: list[Step]) -> list[Finding]:
        head_image = next((outputs[s.node][s.id] for s in steps
                           if s.node == self.cfg.head.name and isinstance(s.check, ImagePresent) and s.node in outputs), None)
        image_id = head_image.stdout.strip() if head_image is not None and head_image.ok else None
        if not image_id:
            return []  # the image check says why
        seen = kept.passed_before(self.cfg, image_id, argv_hash(self.plan.vllm_argvs))
        if seen:
            self.emit("step-skip", vllm_step, reason=f"checked before: vLLM {seen.get('vllm_version')}, same image ID and flags")
            return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, None, f"checked before: vLLM {seen.get('vllm_version')}")]
        # needs the image on the head: runs after the image checks (and fetches)
        self.emit("step-start", vllm_step)
        t1 = time.monotonic()
        try:
            check = self.check_vllm_flags(vllm_step, image_id=image_id)
        except VllmCheckError as exc:
            self.emit("step-failed", vllm_step, duration_s=round(time.monotonic() - t1, 3), error=str(exc))
            return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, str(exc))]
        self.emit("step-ok" if check.ok else "step-failed", vllm_step, duration_s=round(time.monotonic() - t1, 3),
                  vllm_version=check.vllm_version, problems=len(check.problems))
        messages = check.messages(self.cfg)
        if not messages:
            return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, None, f"vLLM {check.vllm_version}")]
        return [Finding(vllm_step.node, vllm_step.id, vllm_step.description, m) for m in messages]

    def check_vllm_flags(self, step: Optional[Step] = None, *, image_id: Optional[str] = None) -> VllmCheck:
        """Run the image's vLLM parser over the rendered argv (throwaway container on the head)."""
        if step is None:
            plan = self.plan
            if not self.cfg.vllm.check_flags:  # asked for explicitly: check even when preflight would not
                cfg = self.cfg.model_copy(update={"vllm": self.cfg.vllm.model_copy(update={"check_flags": True})})
                plan = build_plan(cfg, reveal_secrets=True, kv=kept.kv_capacity(cfg))
            step = next(s for s in plan.steps if isinstance(s.check, VllmFlags))
        t = self.nodes[step.node]
        where = f"image {self.cfg.container.image} on {step.node}"
        try:
            r = t.run(step.command, timeout=step.timeout_s, input=read_template(step.stdin).encode())
        except CommandTimeout:
            t.run(lifecycle.discard_command(step.check.container), timeout=timeouts.CLEANUP_S)
            raise VllmCheckError(f"checking the vllm serve flags with {where} took longer than {step.timeout_s:g} s "
                                 "(vllm.check_timeout_s)") from None
        check = parse_output(r.stdout, r.stderr, r.exit_code, where)
        self._remember_vllm(check, image_id)
        return check

    def _remember_vllm(self, check: VllmCheck, image_id: Optional[str]) -> None:
        """The vLLM version found in the image, for `status` and `plan`, and to skip the same check
        on the next `up` or watchdog restart (same image ID, same flags)."""
        kept.save_check(self.cfg, {"image": self.cfg.container.image, "image_id": image_id, "argv_hash": argv_hash(self.plan.vllm_argvs),
                            "vllm_version": check.vllm_version, "where": check.where, "ok": check.ok})

    def _fetch_missing_images(self, results: dict[str, dict[str, Result]], by_node: dict[str, list[Step]]) -> None:
        """Nodes without the image: `docker pull` it, or else copy it from a node that has it:
        node to node over the cluster link (docker save there, docker load here), or, when that
        fails, streamed through the controller (nodes that cannot open a port to each other)."""
        image = self.cfg.container.image
        have, missing = [], []
        for node, res in results.items():
            step = next(s for s in by_node[node] if isinstance(s.check, ImagePresent))
            (have if res[step.id].ok else missing).append(node)
        for node in missing:
            t = self.nodes[node]
            step = next(s for s in by_node[node] if isinstance(s.check, ImagePresent))
            self.emit("image-fetch", node=node, image=image, how="docker pull")
            pulled = t.run(f"docker pull --quiet {quote(image)}", timeout=timeouts.IMAGE_TRANSFER_S)
            if not pulled.ok and have:
                source = self.nodes[have[0]]
                self.emit("image-fetch", node=node, image=image, how=f"node to node from {source.node} over the cluster link")
                _, _, why = node_to_node(source, t, self.cfg.node(source.node).address, self.cfg.node(node).address,
                                         receive=f"receive-pipe {quote('docker load')}", send=f"send-pipe {quote('docker save ' + quote(image))}",
                                         timeout_s=timeouts.IMAGE_TRANSFER_S)
                if why:
                    self.emit("image-fetch", node=node, image=image, how=f"streamed from {source.node} through the controller ({why})")
                    save, load = source.stream_to(f"docker save {quote(image)}", t, "docker load", timeout=timeouts.IMAGE_TRANSFER_S)
                    if not (save.ok and load.ok):
                        self.emit("image-fetch-failed", node=node, error=(save.stderr + load.stderr)[-500:])
            for s in by_node[node]:  # read again what needs the image
                if isinstance(s.check, (ImagePresent, ImagePlatform, GpuWorks, GdrCapable, MemoryCeiling)):
                    results[node][s.id] = t.run(s.command, timeout=s.timeout_s)


def _free_gib(path: Path) -> Optional[float]:
    """Free space where path is (or would be created: its nearest existing parent)."""
    import shutil

    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free / 2**30
            except OSError:
                return None
    return None


