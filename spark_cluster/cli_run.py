"""What the CLI's commands run beyond one library call: the flag check's choice of vLLM, a group's
JSON, the controller and the watchdog in the foreground, a systemd unit (cli.py holds the commands)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from rich.markup import escape

from .config import ClusterConfig
from .groups import for_each_group, labelled
from .guard import run_until_stopped
from .steps import Plan
from .views import err, out, watch_event_printer


def nodes_of(cfg: ClusterConfig):
    from .transport import Nodes

    return Nodes(cfg)

def check_vllm(cfg: ClusterConfig, p: Plan, target: str):
    """--vllm: the image's own vLLM on the head node, or a local interpreter, environment or release."""
    if target == "image":
        from .executor import Executor

        with nodes_of(cfg) as nodes:
            return Executor(cfg, nodes).check_vllm_flags()
    from .vllm_check import check_local, resolve_python

    return check_local(resolve_python(target, log=lambda m: err.print(f"[dim]{escape(m)}[/]", highlight=False)), p.vllm_argvs)

def per_group(cfg: ClusterConfig, data: dict) -> str:
    """JSON of one group as it always was; of several, {"groups": {label: ...}}."""
    return json.dumps({"groups": data} if cfg.groups else next(iter(data.values())), indent=2) + "\n"

def controller(cfg: ClusterConfig, as_json: bool) -> None:
    from .control_api import serve

    if not as_json:
        gateway, control = cfg.gateway_url(), cfg.controller_url()
        out.print(f"controller: clients use [bold]{gateway}/v1[/] (OpenAI API, failover hidden); status page {control}/ ; "
                  f"metrics {control}/metrics ; API docs {control}/docs", highlight=False)
    run_until_stopped(lambda: serve(cfg))

def print_unit(cfg: ClusterConfig, config: Path, command: str) -> None:
    from .controller import systemd_unit

    sys.stdout.write(systemd_unit(cfg, config, command) + "\n")

def watch(cfg: ClusterConfig, as_json: bool, max_seconds: Optional[float]) -> None:
    from .watchdog import Watchdog

    printer = watch_event_printer(as_json)

    def one(label: str, group: ClusterConfig):
        with nodes_of(group) as nodes:
            return Watchdog(group, nodes, on_event=labelled(printer, label, bool(cfg.groups))).run(max_seconds=max_seconds)

    run_until_stopped(lambda: for_each_group(cfg, one))


def notify_test(cfg: ClusterConfig) -> None:
    from .errors import ConfigError, NotifyFailed
    from .masking import mask
    from .notify import send_test, target_urls

    targets = target_urls(cfg.notify)
    if not targets:
        raise ConfigError("notify.targets is empty: there is no notification target to test")
    results = send_test(targets, cfg.notify, cfg.name)
    secrets = [t.url for t in targets] + cfg.secret_values()
    for name, sent, why in results:
        out.print(f"target {name}: " + ("sent" if sent else f"[red]not sent[/]: {escape(mask(why, secrets))}"), highlight=False)
    failed = [name for name, sent, _ in results if not sent]
    if failed:
        raise NotifyFailed(f"{len(failed)} of {len(results)} notification target(s) did not take the test message: {', '.join(failed)}",
                           hint="check the URL in the target's variable or file, and that this machine reaches the service")


def observability(cfg: ClusterConfig, out_dir: Path, target: Optional[str], alertmanager: str, interval_s: float, force: bool) -> None:
    from .observability import files, write

    written = write(out_dir, files(cfg, target, alertmanager, interval_s), force)
    out.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    out.print(f"check them: promtool check config {out_dir / 'prometheus.yml'} ; promtool test rules {out_dir / 'alerts.test.yml'}\n"
              f"run: prometheus --config.file={out_dir / 'prometheus.yml'} ; import {out_dir / 'dashboard.json'} into Grafana "
              "(docs/observability.md)", highlight=False)



def import_recipe(recipe_path: Path, nodes: Optional[str], config: Optional[Path], name: Optional[str], model_path: Optional[str],
                  out_path: Path, force: bool) -> None:
    """`import`: the recipe read, its cluster.yaml written only when it validates, and what was not carried over said."""
    import yaml

    from .config import load_config, parse_config
    from .errors import ConfigError
    from .observability import write
    from .recipe import import_recipe as convert, nodes_from_list, to_yaml

    try:
        recipe = yaml.safe_load(recipe_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{recipe_path}: cannot read the recipe ({getattr(exc, 'strerror', None) or exc})") from None
    base = None
    if config is not None:
        load_config(config)  # a valid cluster.yaml, or its own clear error
        base = yaml.safe_load(config.read_text())
    if (nodes is None) == (base is None):
        raise ConfigError("give the nodes: --nodes HOST[/ADDRESS],... or --config with an existing cluster.yaml (one of them)")
    imported = convert(recipe, nodes_from_list(nodes) if nodes else base["nodes"], name=name, model_path=model_path, base=base)
    text = to_yaml(imported, recipe, recipe_path.name)
    parse_config(text, f"{out_path} (not written)")  # what is written validates
    written = write(out_path.parent, {out_path.name: text}, force)
    for note in imported.notes:
        err.print(f"[yellow]![/] {escape(note)}", highlight=False)
    out.print(f"wrote {written[0]}: `spark-cluster validate {written[0]}`, then `spark-cluster plan {written[0]}`", highlight=False)
