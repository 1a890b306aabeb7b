"""`safety-checker serve`: the bundled tritonserver, started, announced and supervised until stopped; with
`--gateway-port`, the gateway beside it, pointed at its gRPC port, supervised and stopped with it."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

from safety_checker_admin.admin_key import ADMIN_APIS, read_admin_key
from safety_checker_admin.errors import ServerError
from safety_checker_admin.gateway_process import GatewayProcess
from safety_checker_admin.server import TritonServer, check_ports_free
from safety_checker_admin.supervisor import Supervisor

# The freshly started server's first probe may wait for a model's first batch (onnxruntime warms up).
FIRST_PROBE_TIMEOUT_S = 60.0
# How often an unsupervised `serve` looks whether tritonserver or the gateway has exited.
POLL_S = 0.5


def _banner(
    server: TritonServer, supervisor: Optional[Supervisor], key_source: str, gateway: Optional[GatewayProcess]
) -> None:
    print(f"Serving {server.repository}")
    print(f"  HTTP:    http://{server.http_url}")
    print(f"  gRPC:    {server.grpc_url}")
    print(f"  metrics: {server.metrics_url}")
    print(f"  models:  {', '.join(server.ready_models()) or '(none)'}")
    print(f"  admin:   {', '.join(ADMIN_APIS)}: {key_source}")
    if gateway is not None:
        key = f"Bearer token from {gateway.api_key_file}" if gateway.api_key_file else "no key"
        print(f"  gateway: {gateway.url} (/v2/models/safety-checker/infer, /v1/moderations; {key})")
    if supervisor is None:
        print("  watch:   none (a fault is not repaired)")
    elif supervisor.probe_model is None:
        print(f"  watch:   the server and its Python stubs, every {supervisor.poll_s:g} s (nothing to probe)")
    else:
        print(
            f"  watch:   the server and its Python stubs, and a real inference through "
            f"{supervisor.probe_model} every {supervisor.probe_interval_s:g} s; a fault restarts the server"
        )
    if supervisor is not None and gateway is not None:
        print("           and the gateway: one that exits is restarted")
    print(f"  log:     {server.log_path}")
    if gateway is not None:
        print(f"           {gateway.log_path} (the gateway)")
    print("Press Ctrl-C to stop.", flush=True)


def check_ports(host: str, ports: Mapping[str, int]) -> int:
    """`serve --check-ports`: 0 when every port is free on `host`, else 1 with a line naming the one in use, so
    that `make serve` stops before the export rather than after it."""
    try:
        check_ports_free(host, ports)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"ports free on {host}: " + ", ".join(f"{name} {port}" for name, port in ports.items()))
    return 0


def serve_forever(
    repository: Path,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    model_config_name: Optional[str] = "cpu",
    admin_key_file: Optional[Path] = None,
    supervise: bool = True,
    probe_interval_s: float = 2.0,
    probe_timeout_s: float = 5.0,
    gateway_port: Optional[int] = None,
    gateway_api_key_file: Optional[Path] = None,
) -> int:
    """Serve until Ctrl-C or SIGTERM (exit code 0); 1 with a one-line message on any error.

    Prints where the server listens and which models are READY, then nothing
    more on stdout. With `supervise` a `Supervisor` restores service after a
    fault (one line on stderr for each fault and each restoration); without
    it, the server exiting ends the command with code 1.

    `gateway_port`: also run the gateway (safety-checker-gateway) on that port
    of `host`, against the server's gRPC port, requiring the Bearer token in
    `gateway_api_key_file` if given. The supervisor restarts it when it exits;
    without one, its exit ends the command with code 1 as the server's does.
    It stops before the server.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    server: Optional[TritonServer] = None
    gateway: Optional[GatewayProcess] = None
    try:
        admin_key, key_source = read_admin_key(admin_key_file)
        server = TritonServer(
            Path(repository),
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            host=host,
            model_config_name=model_config_name,
            admin_key=admin_key,
        )
        if gateway_port is not None:  # refused before anything starts when the gateway is not installed
            gateway = GatewayProcess(server.grpc_url, host=host, port=gateway_port, api_key_file=gateway_api_key_file)
        server.start()
        supervisor = None
        if supervise:
            supervisor = Supervisor(
                server, probe_interval_s=probe_interval_s, probe_timeout_s=probe_timeout_s, gateway=gateway
            )
            first = supervisor.probe_fault(timeout_s=max(FIRST_PROBE_TIMEOUT_S, probe_timeout_s))
            if first is not None:
                raise ServerError(f"the freshly started server fails its {first}")
        if gateway is not None:
            gateway.start()
        _banner(server, supervisor, key_source, gateway)
        if supervisor is not None:
            return supervisor.run()
        while server.running and (gateway is None or gateway.running):
            time.sleep(POLL_S)
        if not server.running:
            code = server.return_code
            print(f"error: {server.failure(f'tritonserver exited on its own with code {code}')}", file=sys.stderr)
        else:
            print(f"error: {gateway.failure(f'the gateway exited with code {gateway.return_code}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (ServerError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for sig in handled:  # a second signal must not interrupt the orderly stop
            signal.signal(sig, signal.SIG_IGN)
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
