"""`spark-cluster import RECIPE`: a recipe as Spark owners already write them, turned into a cluster.yaml.

Two formats, both YAML with a `vllm serve` command template whose `{placeholders}` come from `defaults`:
- eugr/spark-vllm-docker's (`recipe_version: "1"`): name, container (an image its build-and-copy.sh
  builds, with build_args), model (the Hugging Face id), mods (patches launch-cluster.sh applies inside
  the container), defaults, env, cluster_only / solo_only, command (Python format: `{{` is a brace);
- sparkrun's (version 2): model, runtime, container, min_nodes / max_nodes / mode, metadata, defaults,
  env, runtime_config (mods, build_args; any unknown top-level key is swept into it), command (`{model}`
  is the model id).

The command is rendered, read as argv, and each flag spark-cluster renders itself becomes its setting;
the rest go to vllm.extra_args. Everything a recipe says that cannot be carried over (a mod, build
arguments, an environment reference to the recipe machine, a flag spark-cluster sets itself) is listed
by name with why: never dropped silently. Pure: the CLI reads and writes the files.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError
from .settings import UNIFIED_MEMORY_CAP

EUGR_KEYS = {"recipe_version", "name", "description", "model", "container", "cluster_only", "solo_only", "build_args", "mods",
             "defaults", "env", "command"}
SPARKRUN_KEYS = {"sparkrun_version", "recipe_version", "model", "runtime", "container", "mode", "min_nodes", "max_nodes", "solo_only",
                 "cluster_only", "metadata", "defaults", "env", "command", "runtime_config"}
# flags spark-cluster renders from a setting: flag -> (section, key, takes a value)
SETTINGS = {
    "--host": ("vllm", "host", True), "--port": ("vllm", "port", True),
    "--tensor-parallel-size": ("vllm", "tensor_parallel_size", True), "-tp": ("vllm", "tensor_parallel_size", True),
    "--pipeline-parallel-size": ("vllm", "pipeline_parallel_size", True), "-pp": ("vllm", "pipeline_parallel_size", True),
    "--max-model-len": ("vllm", "max_model_len", True), "--gpu-memory-utilization": ("vllm", "gpu_memory_utilization", True),
    "--max-num-seqs": ("vllm", "max_num_seqs", True), "--dtype": ("vllm", "dtype", True),
    "--reasoning-parser": ("vllm", "reasoning_parser", True), "--tool-call-parser": ("vllm", "tool_call_parser", True),
    "--enforce-eager": ("vllm", "enforce_eager", False), "--enable-auto-tool-choice": ("vllm", "enable_auto_tool_choice", False),
    "--trust-remote-code": ("vllm", "trust_remote_code", False), "--enable-prefix-caching": ("vllm", "enable_prefix_caching", False),
    "--no-enable-prefix-caching": ("vllm", "enable_prefix_caching", False),
    "--served-model-name": ("model", "served_name", True), "--load-format": ("model", "load_format", True),
    "--safetensors-load-strategy": ("model", "load_strategy", True),
}
INTEGERS = {"port", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "max_num_seqs"}
# flags of the launch itself, which spark-cluster sets from its executor and nodes
OWN_FLAGS = {"--distributed-executor-backend": True, "--nnodes": True, "--node-rank": True, "--master-addr": True,
             "--master-port": True, "--headless": False, "--data-parallel-address": True}
# an existing cluster.yaml's vllm settings that are about the cluster, not the model: kept by `import --config`
KEPT_VLLM = {"endpoint", "master_port", "check_flags", "check_timeout_s", "keep_kv_cache"}
PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


@dataclass
class Imported:
    data: dict[str, Any]  # the cluster.yaml, as data
    notes: list[str] = field(default_factory=list)  # what was not carried over, or changed, and why
    source_format: str = ""


def recipe_format(recipe: dict[str, Any]) -> str:
    if str(recipe.get("recipe_version", "")) == "1" or "build_args" in recipe or "mods" in recipe and "runtime" not in recipe:
        return "eugr"
    return "sparkrun"


def render_command(template: str, params: dict[str, Any]) -> str:
    """The command with its placeholders filled (again while one fills another, as sparkrun does), then
    Python format's doubled braces as single ones (eugr's recipes write JSON as `{{...}}`)."""
    text = template
    for _ in range(5):
        missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - set(params))
        if missing:
            raise ConfigError(f"the recipe's command uses {{{missing[0]}}}, which neither its defaults nor its model give")
        filled = PLACEHOLDER.sub(lambda m: str(params[m.group(1)]), text)
        if filled == text:
            break
        text = filled
    return text.replace("{{", "{").replace("}}", "}")


def serve_argv(command: str) -> list[str]:
    """`vllm serve MODEL ...` as words (line continuations joined), from `vllm` on."""
    try:
        words = shlex.split(command.replace("\\\n", " "))
    except ValueError as exc:
        raise ConfigError(f"the recipe's command cannot be read as shell words: {exc}") from None
    start = next((i for i in range(len(words) - 1) if words[i] == "vllm" and words[i + 1] == "serve"), None)
    if start is None:
        raise ConfigError("the recipe's command is not `vllm serve ...`: spark-cluster serves vLLM only")
    return words[start + 2:]


def flags_to_settings(args: list[str], notes: list[str]) -> tuple[Optional[str], dict[str, dict[str, Any]], list[str]]:
    """The served model (the first word that is not a flag), the settings the known flags give, and the rest (extra_args)."""
    model, settings, extra = None, {"vllm": {}, "model": {}}, []
    i = 0
    while i < len(args):
        word = args[i]
        flag, eq, inline = word.partition("=") if word.startswith("-") else (word, "", "")
        if not word.startswith("-") and model is None:
            model, i = word, i + 1
            continue
        if flag in SETTINGS or flag in OWN_FLAGS:
            takes = SETTINGS[flag][2] if flag in SETTINGS else OWN_FLAGS[flag]
            value = (inline if eq else (args[i + 1] if i + 1 < len(args) else None)) if takes else None
            if takes and value is None:
                raise ConfigError(f"the recipe's command ends with {flag} and no value")
            i += 1 if (eq or not takes) else 2
            if flag in OWN_FLAGS:
                notes.append(f"{flag}{' ' + value if value else ''}: set by spark-cluster itself from its executor and nodes")
                continue
            section, key, _ = SETTINGS[flag]
            settings[section][key] = _typed(flag, key, value) if takes else flag != "--no-enable-prefix-caching"
            continue
        extra.append(word)
        i += 1
    return model, settings, extra


def _typed(flag: str, key: str, value: str) -> Any:
    try:
        return int(value) if key in INTEGERS else float(value) if key == "gpu_memory_utilization" else value
    except ValueError:
        raise ConfigError(f"the recipe's {flag} {value!r} is not a number") from None


def _mapping(recipe: dict[str, Any], key: str) -> dict[str, Any]:
    value = recipe.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"the recipe's {key} is not a mapping of names to values")
    return value


def _check_topology(recipe: dict[str, Any], gpus: int, tp: int, pp: int, notes: list[str]) -> int:
    """The tensor-parallel size for these nodes (one rank per GPU), or a clear refusal."""
    solo = recipe.get("solo_only") is True or recipe.get("mode") == "solo" or recipe.get("max_nodes") == 1
    if not isinstance(recipe.get("min_nodes") or 1, int):
        raise ConfigError(f"the recipe's min_nodes {recipe.get('min_nodes')!r} is not a number")
    least = max(recipe.get("min_nodes") or 1, 2 if recipe.get("cluster_only") is True or recipe.get("mode") == "cluster" else 1)
    if solo and gpus > 1:
        raise ConfigError("the recipe runs on one node only (solo_only): spark-cluster serves one model across several nodes; "
                          "give one node, or use a recipe for a cluster")
    if gpus < least:
        raise ConfigError(f"the recipe needs at least {least} nodes (cluster_only / min_nodes), {gpus} given")
    if tp * pp == gpus:
        return tp
    if tp == 1 and gpus % pp == 0:  # a recipe that also runs solo, given a cluster
        notes.append(f"tensor_parallel {tp} of the recipe became {gpus // pp}: one rank per GPU of the {gpus} given "
                     "(as eugr's run-recipe.sh and sparkrun do in cluster mode)")
        return gpus // pp
    raise ConfigError(f"the recipe runs TP={tp} x PP={pp} = {tp * pp} ranks, one per GPU, but {gpus} GPU(s) are given")


def _env(env: dict[str, Any], notes: list[str]) -> dict[str, str]:
    out = {}
    for k, v in (env or {}).items():
        if v is None:
            continue
        if re.search(r"\$\{?[A-Za-z_]", str(v)):
            notes.append(f"env {k}={v}: refers to the environment of the machine running the recipe; set its value in "
                         "container.env (secret names are masked wherever spark-cluster writes them)")
            continue
        out[str(k)] = str(v)
    return out


def _not_carried(recipe: dict[str, Any], fmt: str, notes: list[str]) -> None:
    runtime_config = dict(recipe.get("runtime_config") or {})
    known = EUGR_KEYS if fmt == "eugr" else SPARKRUN_KEYS
    runtime_config.update({k: v for k, v in recipe.items() if k not in known | EUGR_KEYS})
    mods = list(recipe.get("mods") or []) + list(runtime_config.pop("mods", None) or [])
    build_args = list(recipe.get("build_args") or []) + list(runtime_config.pop("build_args", None) or [])
    for mod in mods:
        notes.append(f"mod {mod}: not carried over: a mod patches files inside the container when eugr's launch-cluster.sh starts it; "
                     "spark-cluster runs the image as it is: build an image with the patch applied and name it in container.image")
    if build_args:
        notes.append(f"build_args {' '.join(map(str, build_args))}: not carried over: they build the image with eugr's build-and-copy.sh; "
                     f"build {recipe.get('container')} that way on one node (`up` copies it to the others over the cluster link)")
    for key in sorted(runtime_config):
        notes.append(f"{key}: not carried over: not a setting spark-cluster knows")
    if recipe.get("metadata"):
        notes.append(f"metadata ({', '.join(sorted(recipe['metadata']))}): descriptive (sparkrun's listing and VRAM estimate); "
                     "spark-cluster measures the memory CUDA can allocate before a start instead")
    runtime = recipe.get("runtime")
    if runtime not in (None, "vllm", "eugr-vllm"):
        raise ConfigError(f"the recipe's runtime is {runtime}: spark-cluster serves vLLM only")


def slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")[:40].strip("-") or "cluster"


def import_recipe(recipe: Any, nodes: list[dict[str, Any]], *, name: Optional[str] = None, model_path: Optional[str] = None,
                  base: Optional[dict[str, Any]] = None) -> Imported:
    """The cluster.yaml (as data) for a recipe on these nodes (the first is the head), or on an existing
    cluster.yaml's (base: its nodes and settings kept, its container, model and vllm replaced)."""
    if not isinstance(recipe, dict) or not recipe.get("command") or not recipe.get("container"):
        raise ConfigError("not a recipe: a recipe is a YAML mapping with at least `container` and `command` (a `vllm serve` template)")
    fmt, notes = recipe_format(recipe), []
    for key in ("defaults", "env", "metadata", "runtime_config"):
        _mapping(recipe, key)
    _not_carried(recipe, fmt, notes)
    hf_id = recipe.get("model")
    params = {**{k: v for k, v in (recipe.get("defaults") or {}).items() if v is not None}, **({"model": hf_id} if hf_id else {})}
    served, settings, extra = flags_to_settings(serve_argv(render_command(str(recipe["command"]), params)), notes)
    hf_id = hf_id or served
    if not hf_id:
        raise ConfigError("the recipe names no model: neither `model` nor a model after `vllm serve`")
    vllm, model = settings["vllm"], settings["model"]
    gpus = sum(int(n.get("gpus", 1)) if isinstance(n, dict) and isinstance(n.get("gpus", 1), int) else 1 for n in nodes)
    pp = int(vllm.pop("pipeline_parallel_size", 1))
    tp = _check_topology(recipe, gpus, int(vllm.pop("tensor_parallel_size", 1)), pp, notes)
    util = vllm.get("gpu_memory_utilization")
    if util is not None and util > UNIFIED_MEMORY_CAP:
        notes.append(f"gpu_memory_utilization {util:g} of the recipe became {UNIFIED_MEMORY_CAP}: above it a Spark's unified memory "
                     "freezes the box instead of failing (memory.override_cap: true allows more; `doctor` says the highest that starts)")
        vllm["gpu_memory_utilization"] = UNIFIED_MEMORY_CAP
    data = dict(base or {})
    data.update(name=name or (base or {}).get("name") or slug(str(recipe.get("name") or hf_id.split("/")[-1])), nodes=nodes)
    data.setdefault("nccl", "auto")
    container = dict(data.get("container") or {})
    container.update(image=str(recipe["container"]), env={**container.get("env", {}), **_env(recipe.get("env") or {}, notes)})
    data["container"] = container
    folder = hf_id.split("/")[-1]
    base_path = str(((base or {}).get("model") or {}).get("path") or "")
    path = model_path or (base_path if base_path.rstrip("/").split("/")[-1] == folder else f"/srv/models/{folder}")  # the same model's folder
    data["model"] = {"path": path, "served_name": model.pop("served_name", hf_id), **model}
    notes.append(f"model {hf_id}: served from {path} on every node: download it there on one node (`spark-cluster sync` copies it to "
                 "the others over the cluster link)" + ("" if model_path else "; --model-path names another folder"))
    kept = {k: v for k, v in ((base or {}).get("vllm") or {}).items() if k in KEPT_VLLM}  # how it runs here, not what it serves
    data["vllm"] = {**kept, **vllm, "tensor_parallel_size": tp, **({"pipeline_parallel_size": pp} if pp != 1 else {}),
                    **({"extra_args": extra} if extra else {})}
    return Imported(data=data, notes=notes, source_format=fmt)


def nodes_from_list(text: str) -> list[dict[str, Any]]:
    """`HOST[/ADDRESS],...`: SSH host and cluster-link address of each node, the first the head."""
    nodes = []
    for i, item in enumerate(x.strip() for x in text.split(",") if x.strip()):
        host, _, address = item.partition("/")
        nodes.append({"name": f"spark-{i + 1}", "host": host, "address": address or host, "role": "head" if i == 0 else "worker"})
    if not nodes:
        raise ConfigError("--nodes names no node: give HOST[/ADDRESS],... (the first is the head)")
    return nodes


def to_yaml(imported: Imported, recipe: dict[str, Any], source: str) -> str:
    """The cluster.yaml's text: where it came from and what was not carried over, as comments, then the settings."""
    import yaml

    what = recipe.get("description") or (recipe.get("metadata") or {}).get("description") or recipe.get("name") or ""
    head = [f"# from {source} ({'eugr/spark-vllm-docker' if imported.source_format == 'eugr' else 'sparkrun'} recipe)"
            + (f": {what}" if what else ""), "# `spark-cluster validate` and `spark-cluster plan` show what it does.", "#"]
    head += ["# not carried over, or changed:"] + [f"#  - {n}" for n in imported.notes] if imported.notes else []
    return "\n".join(head) + "\n\n" + yaml.safe_dump(imported.data, sort_keys=False, allow_unicode=True)
