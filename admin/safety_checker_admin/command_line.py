"""tritonserver's command line and environment: one rendering for every place the checker is served.

The bundled server (`safety-checker serve`), docker-compose's triton service
and the KServe ServingRuntimes run tritonserver with the arguments and the
malloc settings below; what differs between them is a parameter (where the
repository is, the ports and the address bound, the model configuration, the
admin key or the reference a deployment expands into it, the log level).
`python -m deploy.render` writes them into docker-compose.yml and
deploy/kserve/, with NOTES as the comments that say why, and
tests/test_deploy_manifests.py checks that those files hold what it renders.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

from safety_checker_admin.admin_key import restriction

# tritonserver's own defaults, which every deployment serves on.
DEFAULT_PORTS: Mapping[str, int] = {"HTTP": 8000, "gRPC": 8001, "metrics": 8002}
# gRPC request/response objects kept for reuse: none, since each keeps the capacity of the largest request it
# held for as long as the server runs.
GRPC_ALLOCATION_POOL = 0
# How long SIGTERM waits for requests in flight, and for idle keep-alive connections, which would otherwise
# hold every shutdown for tritonserver's default of 30 s.
EXIT_TIMEOUT_S = 10

# glibc malloc settings for tritonserver and its stubs: every allocation of MALLOC_MMAP_THRESHOLD_ bytes or more
# (gRPC's receive buffers, request tensors) is mmapped and so handed back to the system when freed, instead of
# staying in a heap arena that only grows; few arenas for Triton's many threads (measured: docs/robustness.md).
MALLOC_ENVIRONMENT: Mapping[str, str] = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "32768",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}

# Why each argument is there, by flag: the comments the rendered manifests carry.
NOTES: Dict[str, str] = {
    "--model-config-name": "Every model's configs/NAME.pbtxt where it has one, else its config.pbtxt.",
    "--model-control-mode": "Models load at start-up and cannot be loaded, unloaded or replaced through the API.",
    "--strict-readiness": "/v2/health/ready is true only once every model has loaded.",
    "--exit-on-error": "A model that fails to load stops the server, which says why.",
    "--exit-timeout-secs": "How long SIGTERM waits for requests in flight and idle keep-alive connections.",
    "--grpc-infer-allocation-pool-size": "gRPC request objects are not kept for reuse: each would keep the "
    "capacity of the largest request it held for as long as the server runs.",
    "--http-restricted-api": "The admin APIs (model repository, logging, trace, shared memory) need the key: "
    "header admin-key over HTTP, metadata triton-grpc-protocol-admin-key over gRPC (Triton 2.51: "
    "<apis>:<header>=<key>). Inference, health, metadata and statistics stay open.",
}
MALLOC_NOTE = (
    "glibc malloc: every allocation of MALLOC_MMAP_THRESHOLD_ bytes or more (gRPC receive buffers, request "
    "tensors) mmapped, so that it goes back to the system when freed instead of growing a heap arena; few arenas "
    "for Triton's many threads (measured: docs/robustness.md)."
)


def arguments(
    repository: str,
    *,
    admin_key: Optional[str],
    model_config_name: Optional[str] = None,
    ports: Mapping[str, int] = DEFAULT_PORTS,
    host: Optional[str] = None,
    log_verbose: str = "0",
) -> List[str]:
    """tritonserver's arguments (without the program): the same flags in the same order wherever it runs.

    `admin_key`: the key, or the reference a deployment expands (`$(ADMIN_API_KEY)`); None leaves the
    restriction to a wrapper that makes up the key (docker-compose's entrypoint draws a random one when none is
    set). `model_config_name`: None serves every model's config.pbtxt. `host`: the address HTTP, gRPC and metrics
    bind to; None, every interface. `log_verbose`: a level, or what a deployment expands into one."""
    flags = [f"--model-repository={repository}"]
    if model_config_name is not None:
        flags.append(f"--model-config-name={model_config_name}")
    flags += [
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
    ]
    for flag, name in (("http", "HTTP"), ("grpc", "gRPC"), ("metrics", "metrics")):
        if host is not None:
            flags.append(f"--{flag}-address={host}")
        flags.append(f"--{flag}-port={ports[name]}")
    flags += [
        "--allow-metrics=true",
        f"--grpc-infer-allocation-pool-size={GRPC_ALLOCATION_POOL}",
        f"--log-verbose={log_verbose}",
    ]
    if admin_key is not None:
        flags += restricted(admin_key)
    return flags


def restricted(admin_key: str) -> List[str]:
    """The two arguments that restrict the admin APIs, over HTTP and gRPC, to callers with `admin_key`."""
    value = restriction(admin_key)
    return [f"--http-restricted-api={value}", f"--grpc-restricted-protocol={value}"]


def note(argument: str) -> Optional[str]:
    """Why `argument` is there, if NOTES says (the gRPC restriction shares the HTTP one's note)."""
    return NOTES.get(argument.split("=", 1)[0])
