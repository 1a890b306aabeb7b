"""`python -m deploy.render`: write tritonserver's command line into docker-compose.yml and the KServe manifests.

The arguments and the malloc environment come from one place,
safety_checker_admin.command_line, which the bundled server's launcher runs
too; this writes them into the blocks of the committed files that hold them,
and leaves every other line as it is:

* docker-compose.yml: the triton service's `command`, the lines of its
  entrypoint from `key=` to `restricted=` (the key it reads or draws, the
  check that refuses a short or placeholder key, the admin restriction), and
  the MALLOC_* entries of its `environment`;
* deploy/kserve/servingruntime-{gpu,cpu}.yaml: the container's `command` (a
  shell that refuses a short or placeholder key before it execs
  tritonserver), its `args` and the MALLOC_* entries of its `env`;
* deploy/kserve/template.yaml: its object, which is servingruntime-gpu.yaml
  without the comments;
* the gateway's command line (safety_checker_admin.gateway_process, which
  `safety-checker serve --gateway-port` runs too): docker-compose.yml's
  gateway service's `command`, and the `command` of the transformer of
  deploy/kserve/inferenceservice-s3.yaml (a shell that turns the arguments
  KServe gives a transformer into the gateway's, then execs it).

`--check` writes nothing and exits 1 if a file differs from what would be
written; tests/test_deploy_manifests.py checks the same.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import yaml

from safety_checker_admin import command_line, gateway_process
from safety_checker_admin.admin_key import MIN_KEY_CHARS, restriction, shell_check

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
KSERVE = ROOT / "deploy" / "kserve"
GPU_RUNTIME = KSERVE / "servingruntime-gpu.yaml"
CPU_RUNTIME = KSERVE / "servingruntime-cpu.yaml"
TEMPLATE = KSERVE / "template.yaml"
GATEWAY_SERVICE = KSERVE / "inferenceservice-s3.yaml"
WIDTH = 100

INTRO = (
    "tritonserver's command line, rendered by `python -m deploy.render` from "
    "admin/safety_checker_admin/command_line.py: change it there, not here."
)
KSERVE_KEY_ENV = "ADMIN_API_KEY"
KSERVE_KEY = f"$({KSERVE_KEY_ENV})"
KSERVE_SECRET = "safety-checker-admin-api"
# The runtime container's command: the admin key's check, then tritonserver with the args ("$@").
KSERVE_CHECK = [
    *shell_check(
        KSERVE_KEY_ENV,
        f"in the Secret {KSERVE_SECRET}",
        "create the Secret with a random key (openssl rand -hex 32), as docs/deploy-kserve.md shows",
    ),
    'exec "$@"',
]
KSERVE_COMMAND_NOTE = (
    f"Refuses to start tritonserver with an admin key (the Secret {KSERVE_SECRET}) shorter than {MIN_KEY_CHARS} "
    "characters or "
    "a placeholder the repository printed, then runs the args below. Rendered by `python -m deploy.render` from "
    "admin/safety_checker_admin/admin_key.py."
)
KSERVE_INTRO = (
    f"{INTRO} Kubernetes replaces {KSERVE_KEY} with the env var below before it starts the container, so whoever "
    "can exec into the pod can read the key on tritonserver's command line (as they can read the env var)."
)
# The model configuration docker-compose serves: a knob, named even for the default (tritonserver refuses "").
COMPOSE_MODEL_CONFIG = "${TRITON_MODEL_CONFIG_NAME:-exact}"
COMPOSE_NOTES = {
    "--model-config-name": '"exact" (no model has configs/exact.pbtxt, so every model uses its config.pbtxt: the '
    'exact fp32 embedder); "fast": the embedder\'s configs/fast.pbtxt (TensorRT FP16, not exact). '
    "tritonserver refuses an empty value, hence a name.",
}
COMPOSE_LOG_VERBOSE = "${TRITON_LOG_VERBOSE:-0}"
# The entrypoint's key: $TRITON_ADMIN_KEY, or one drawn at random; then its check and the restriction it opens.
# Written as the shell runs them; Compose's literal `$` is `$$`.
COMPOSE_KEY_LINES = [
    "key=\"${TRITON_ADMIN_KEY:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')}\"",
    *shell_check(
        "key",
        "in TRITON_ADMIN_KEY",
        "set TRITON_ADMIN_KEY to a random key (openssl rand -hex 32), or unset it to refuse the admin APIs to everyone",
    ),
    f'restricted="{restriction("$key")}"',
]


# The gateway: where it listens in a container, and where compose's triton service answers gRPC.
GATEWAY_PORT = 8080  # KServe's port for a transformer, and the gateway's default
COMPOSE_TRITON = f"triton:{command_line.DEFAULT_PORTS['gRPC']}"
GATEWAY_INTRO = (
    "The gateway's command line, rendered by `python -m deploy.render` from "
    "admin/safety_checker_admin/gateway_process.py: change it there, not here."
)
# The transformer's command: KServe appends `--model_name NAME --predictor_host HOST --http_port PORT` (and
# `--workers N`) to a transformer's arguments; they become the gateway's model name, Triton's host (its gRPC port
# from TRITON_GRPC_PORT) and its port. Any other argument goes to the gateway as it is. Kubernetes expands only
# $(VAR) in a command, so the shell's ${...} and "$@" reach it unchanged.
TRANSFORMER_SCRIPT = [
    'triton=""',
    'take=""',
    "for arg do",
    "  shift",
    '  case "$take" in',
    '    host) triton="${arg%:*}" ;;',
    '    name) set -- "$@" --model-name="$arg" ;;',
    '    port) set -- "$@" --port="$arg" ;;',
    "  esac",
    '  if [ -n "$take" ]; then take=""; continue; fi',
    '  case "$arg" in',
    "    --predictor_host) take=host ;;",
    "    --model_name) take=name ;;",
    "    --http_port) take=port ;;",
    "    --workers) take=drop ;;",
    '    *) set -- "$@" "$arg" ;;',
    "  esac",
    "done",
    'if [ -z "$triton" ]; then',
    '  echo "error: no --predictor_host: this runs as the transformer of an InferenceService" >&2',
    "  exit 1",
    "fi",
    "# The Secret safety-checker-gateway-api, when it exists, holds the Bearer token callers send.",
    'if [ -f "$GATEWAY_API_KEY_FILE" ]; then set -- --api-key-file="$GATEWAY_API_KEY_FILE" "$@"; fi',
]
TRANSFORMER_NOTE = (
    "KServe appends --model_name NAME --predictor_host HOST --http_port PORT to a transformer's arguments: the shell "
    "below makes them the gateway's --model-name, Triton's host (gRPC port $TRITON_GRPC_PORT) and --port, and "
    "passes any other argument on. Rendered by `python -m deploy.render` from "
    "admin/safety_checker_admin/gateway_process.py."
)


def gateway_command(triton: str) -> List[str]:
    """`safety-checker gateway` as a container runs it: every interface, the gateway's port."""
    return ["safety-checker", "gateway", *gateway_process.arguments(triton, host="0.0.0.0", port=GATEWAY_PORT)]


class RenderError(RuntimeError):
    """A file no longer has the block this writes into where it expects it."""


def scalar(value: str) -> str:
    """`value` as a YAML scalar: plain where YAML reads it back as the same string, double-quoted otherwise."""
    try:
        plain = yaml.safe_load(value) == value and not value.startswith(("#", "'", '"', "{", "["))
    except yaml.YAMLError:
        plain = False
    return value if plain and ": " not in value and " #" not in value else json.dumps(value)


def comment(text: str, indent: str) -> List[str]:
    return [f"{indent}# {line}\n" for line in textwrap.wrap(text, WIDTH - len(indent) - 2)]


def argument_lines(args: Sequence[str], indent: str, intro: str, notes: Mapping[str, str] = {}) -> List[str]:
    """A YAML sequence of the arguments, each under the note that says why it is there."""
    lines = comment(intro, indent)
    for arg in args:
        flag = arg.split("=", 1)[0]
        note = notes[flag] if flag in notes else command_line.note(arg)
        if note:
            lines += comment(note, indent)
        lines.append(f"{indent}- {scalar(arg)}\n")
    return lines


def _key_line(lines: List[str], path: Sequence[str]) -> int:
    """The index of the line holding the mapping key at `path` (block scalars and comments skipped)."""
    stack: List[tuple] = []
    scalar_column: Optional[int] = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        column = len(line) - len(line.lstrip())
        if scalar_column is not None and column > scalar_column:
            continue
        scalar_column = column if re.search(r"(^-|:)\s*[|>][-+]?$", stripped) else None
        match = re.match(r"^\s*(?:- )?([\w./-]+):(?:\s|$)", line)
        if match:
            while stack and stack[-1][0] >= match.start(1):
                stack.pop()
            stack.append((match.start(1), match.group(1)))
            if [key for _, key in stack] == list(path):
                return index
    raise RenderError(f"no key {'.'.join(path)}")


def replace_sequence(text: str, path: Sequence[str], render: Callable[[str], List[str]]) -> str:
    """`text` with the sequence under the key at `path` replaced by render(indent of its items)."""
    lines = text.splitlines(keepends=True)
    index = _key_line(lines, path)
    column = len(lines[index]) - len(lines[index].lstrip())
    end = index + 1
    while end < len(lines) and lines[end].strip():
        indent = len(lines[end]) - len(lines[end].lstrip())
        if indent < column or (indent == column and not lines[end].lstrip().startswith("- ")):
            break
        end += 1
    return "".join(lines[: index + 1] + render(" " * (column + 2)) + lines[end:])


def replace_malloc(text: str, entry: str, lines_per_entry: int, render: Callable[[str], List[str]]) -> str:
    """`text` with its MALLOC_* entries (each `lines_per_entry` lines, the first matching `entry`) and the comment
    right above them replaced by render(their indent)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(entry, line)]
    if not starts or starts != list(range(starts[0], starts[0] + lines_per_entry * len(starts), lines_per_entry)):
        raise RenderError(f"no run of MALLOC_* entries matching {entry!r}")
    indent = lines[starts[0]][: len(lines[starts[0]]) - len(lines[starts[0]].lstrip())]
    first = starts[0]
    while first > 0 and lines[first - 1].startswith(f"{indent}#"):
        first -= 1
    return "".join(lines[:first] + render(indent) + lines[starts[-1] + lines_per_entry :])


def compose(text: str) -> str:
    args = command_line.arguments(
        "/models", admin_key=None, model_config_name=COMPOSE_MODEL_CONFIG, log_verbose=COMPOSE_LOG_VERBOSE
    )
    text = replace_sequence(
        text,
        ("services", "triton", "command"),
        lambda i: argument_lines(["tritonserver", *args], i, INTRO, COMPOSE_NOTES),
    )
    text, count = re.subn(
        r'^( *)key=".*\n(?:.*\n)*?\1restricted=".*"\n',
        lambda m: "".join(f"{m.group(1)}{line}".rstrip() + "\n" for line in COMPOSE_KEY_LINES).replace("$", "$$"),
        text,
        flags=re.M,
    )
    if count != 1:
        raise RenderError(f"{count} blocks from key= to restricted= in the triton entrypoint, expected one")

    def malloc(indent: str) -> List[str]:
        entries = [f"{indent}{name}: {json.dumps(value)}\n" for name, value in command_line.MALLOC_ENVIRONMENT.items()]
        return comment(command_line.MALLOC_NOTE, indent) + entries

    text = replace_malloc(text, r"^\s+MALLOC_\w+: ", 1, malloc)
    return replace_sequence(
        text,
        ("services", "gateway", "command"),
        lambda i: comment(GATEWAY_INTRO, i) + [f"{i}- {scalar(arg)}\n" for arg in gateway_command(COMPOSE_TRITON)],
    )


def transformer(text: str) -> str:
    """The InferenceService's transformer `command`: KServe's arguments made the gateway's, then the gateway."""
    exec_line = " ".join(f'"{arg}"' for arg in gateway_command("$triton:$TRITON_GRPC_PORT")) + ' "$@"'

    def command(indent: str) -> List[str]:
        script = [f"{indent}- |\n"] + [f"{indent}  {line}".rstrip() + "\n" for line in TRANSFORMER_SCRIPT]
        script.append(f"{indent}  exec {exec_line}\n")
        shell = [f"{indent}- /bin/sh\n", f"{indent}- -c\n"]
        return comment(TRANSFORMER_NOTE, indent) + shell + script + [f"{indent}- kserve-transformer\n"]

    return replace_sequence(text, ("spec", "transformer", "containers", "command"), command)


def runtime(text: str, model_config_name: Optional[str]) -> str:
    args = command_line.arguments("/mnt/models", admin_key=KSERVE_KEY, model_config_name=model_config_name)
    text = replace_sequence(
        text, ("spec", "containers", "args"), lambda i: argument_lines(["tritonserver", *args], i, KSERVE_INTRO)
    )

    def command(indent: str) -> List[str]:
        script = [f"{indent}- |\n"] + [f"{indent}  {line}".rstrip() + "\n" for line in KSERVE_CHECK]
        shell = [f"{indent}- /bin/sh\n", f"{indent}- -c\n"]
        return comment(KSERVE_COMMAND_NOTE, indent) + shell + script + [f"{indent}- admin-key-check\n"]

    text = replace_sequence(text, ("spec", "containers", "command"), command)

    def malloc(indent: str) -> List[str]:
        entries = []
        for name, value in command_line.MALLOC_ENVIRONMENT.items():
            entries += [f"{indent}- name: {name}\n", f"{indent}  value: {json.dumps(value)}\n"]
        return comment(command_line.MALLOC_NOTE, indent) + entries

    return replace_malloc(text, r"^\s+- name: MALLOC_\w+$", 2, malloc)


def template(text: str, gpu_runtime: str) -> str:
    """template.yaml's head as it is, and its object: the GPU runtime without its comments."""
    head, found, _ = text.partition("\nobjects:\n")
    if not found:
        raise RenderError("no objects: in the template")
    dumped = yaml.safe_dump([yaml.safe_load(gpu_runtime)], sort_keys=False, width=1000)
    return f"{head}\nobjects:\n" + "".join(f"  {line}" if line.strip() else line for line in dumped.splitlines(True))


def rendered() -> Dict[Path, str]:
    """Each file this writes, as it must read."""
    gpu = runtime(GPU_RUNTIME.read_text(), None)
    return {
        COMPOSE: compose(COMPOSE.read_text()),
        GPU_RUNTIME: gpu,
        CPU_RUNTIME: runtime(CPU_RUNTIME.read_text(), "cpu"),
        TEMPLATE: template(TEMPLATE.read_text(), gpu),
        GATEWAY_SERVICE: transformer(GATEWAY_SERVICE.read_text()),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    files = rendered()
    stale = [path for path, text in files.items() if path.read_text() != text]
    for path in stale:
        if args.check:
            print(f"{path.relative_to(ROOT)} differs from what python -m deploy.render writes", file=sys.stderr)
        else:
            path.write_text(files[path])
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
