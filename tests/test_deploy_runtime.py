"""The KServe runtime's own command line, run for real, and one concept set for every replica.

The CPU ServingRuntime's container arguments (what `python -m deploy.render`
writes there) are read from the YAML and run by
the bundled tritonserver (2.51, the NGC 24.10 release's). What is substituted,
and nothing else: the three ports (free ones, so tests never collide), the
backend directory (the launcher adds `--backend-directory`: the wheel keeps
its backends elsewhere than the NGC image, and a prefix for the Python
backend's shared memory, so that a killed server's is removed), and `$(ADMIN_API_KEY)`, which the
kubelet expands from the Secret and is expanded here from a key made as the
guides make the Secret's. The runtime's `command` (the admin key's check,
then the args) wraps the server as it does in the container. The paths stay
as written: each server runs in a private mount namespace (`unshare`) whose /mnt holds the exported repository at
/mnt/models and a folder laid out exactly like a ConfigMap volume at
/mnt/concepts. The GPU runtime's arguments differ only in the model config
name (its embedder needs the onnxruntime backend, which the wheel lacks); the
manifest tests check that.

The container as OpenShift's restricted-v2 SCC runs it (`in_container`): an
arbitrary non-root uid in group 0, no HOME, a read-only root filesystem with
empty tmpfs folders where the runtime mounts its emptyDirs (/tmp, /dev/shm),
and the repository read-only. Its Python models see only what the NGC
image's Python has (the standard library and NumPy: tests/image_python.py's
stand-in, which the repository is exported for) besides their packed
environments.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import image_python
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from conftest import ROOT, run_export
from tritonclient.utils import InferenceServerException

from safety_checker_admin.admin_key import MIN_KEY_CHARS, PLACEHOLDER_KEYS
from safety_checker_admin.errors import ServerError
from safety_checker_admin.procfs import child_processes, running
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_served import concept_set, concept_writer

pytestmark = [pytest.mark.server, pytest.mark.slow]

DEPLOY = ROOT / "deploy" / "kserve"
MODELS, CONCEPTS = "/mnt/models", "/mnt/concepts"
KEY_HEADER = "admin-key"
# Over gRPC, Triton expects the restricted-protocol header under this prefix.
GRPC_KEY_HEADER = f"triton-grpc-protocol-{KEY_HEADER}"
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# A bound on a hung probe, not a measure of one.
HUNG_S = 300


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


# The Secret's key, made as the guides make it at install (`openssl rand -hex 32`): no manifest holds one.
SECRET_KEY = secrets.token_hex(32)


def secret_key() -> str:
    return SECRET_KEY


def key_check(key: str) -> List[str]:
    """The CPU runtime's container `command` (the admin key's check, then `exec "$@"`), under the env var the
    kubelet sets from the Secret: what runs before the args."""
    (container,) = manifest("servingruntime-cpu.yaml")["spec"]["containers"]
    (variable,) = [e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    return ["env", f"{variable}={key}", *container["command"]]


def runtime_arguments(ports: Dict[str, int]) -> List[str]:
    """The CPU runtime's args after `tritonserver`, with only the ports and the Secret's key substituted."""
    (container,) = manifest("servingruntime-cpu.yaml")["spec"]["containers"]
    args = container["args"]
    assert args[0] == "tritonserver"
    flags = {"--http-port": ports["http"], "--grpc-port": ports["grpc"], "--metrics-port": ports["metrics"]}
    out = []
    for arg in args[1:]:
        name = arg.split("=", 1)[0]
        arg = f"{name}={flags[name]}" if name in flags else arg
        out.append(arg.replace("$(ADMIN_API_KEY)", secret_key()))
    assert f"--model-repository={MODELS}" in out
    return out


@pytest.mark.parametrize("bad", [*PLACEHOLDER_KEYS, "k" * (MIN_KEY_CHARS - 1)], ids=["placeholder", "short"])
def test_finding_4_the_runtime_refuses_to_start_with_a_short_or_placeholder_key(bad, tmp_path):
    """Issue 18, finding 4: the runtime's command stops the container before tritonserver starts when the Secret's
    key is a placeholder or too short, with one line that names the Secret and how to make a key; with a good key it
    runs the args (test_runtime_arguments_load_and_answer_with_admin_apis_restricted starts the server so)."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    server = TritonServer(
        tmp_path,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        arguments=runtime_arguments(ports),
        wrapper=key_check(bad),
    )
    with pytest.raises(ServerError) as refused:
        server.start(timeout_s=120)
    log = server.log_path.read_text()
    assert "exited with code 1" in str(refused.value)
    (line,) = log.splitlines()  # the check's line, and nothing from a tritonserver
    assert line.startswith("error: the admin key in the Secret safety-checker-admin-api "), line
    assert "openssl rand -hex 32" in line and bad not in line
    assert ("placeholder" if bad in PLACEHOLDER_KEYS else f"has {len(bad)} characters, not {MIN_KEY_CHARS}-") in line
    started = subprocess.run([*key_check(secret_key()), "echo", "tritonserver ran"], capture_output=True, text=True)
    assert (started.returncode, started.stdout, started.stderr) == (0, "tritonserver ran\n", "")


def configmap_volume(directory: Path, files: Dict[str, str], stamp: str) -> None:
    """Write `files` as the kubelet writes a ConfigMap volume: a timestamped folder, `..data` pointing to it,
    one symlink per key through `..data`; a later call swaps `..data` in one rename, as an update does."""
    directory.mkdir(parents=True, exist_ok=True)
    folder = directory / f"..{stamp}"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    previous = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.symlink(folder.name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if previous is not None:
        shutil.rmtree(directory / previous)


# The uid restricted-v2 gives a pod (one from its project's range), in group 0 as OpenShift runs it.
UID = 1000680000


def empty_dirs() -> List[str]:
    """Where the CPU runtime mounts an emptyDir: empty tmpfs folders in the container, all else read-only."""
    runtime = manifest("servingruntime-cpu.yaml")
    (container,) = runtime["spec"]["containers"]
    empty = {v["name"] for v in runtime["spec"]["volumes"] if "emptyDir" in v}
    return [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty]


# The container, in a private mount namespace set up as root: the repository and the concepts read-only at
# /mnt, the emptyDirs as empty tmpfs folders, the root filesystem read-only, then the command as UID in group 0
# with no HOME, from /. Arguments: the repository, the concepts, the image's folders that sit where they would
# be hidden here (":"-separated; in /tmp, in root's home, the launcher's private backends), then the command.
CONTAINER = (
    """set -e
repository=$1 concepts=$2 image=$3
shift 3
for arg do
  case "$arg" in --backend-directory=*) backends=${arg#*=} ;; esac
done
if [ -n "${backends:-}" ]; then
  chmod 755 "$backends"  # the launcher's copy of what the image has, world-readable, in /opt/tritonserver
  image="$image:$backends"
fi
mount -t tmpfs -o mode=755 tmpfs /mnt
mkdir /mnt/models /mnt/concepts /mnt/.image
mount --bind "$repository" /mnt/models
mount -o remount,bind,ro /mnt/models
mount --bind "$concepts" /mnt/concepts
mount -o remount,bind,ro /mnt/concepts
IFS=:
n=0
for path in $image; do n=$((n + 1)); mkdir /mnt/.image/$n; mount --bind "$path" /mnt/.image/$n; done
mount -t tmpfs -o mode=755 tmpfs /root
"""
    + "".join(f"mount -t tmpfs -o mode=1777 tmpfs {folder}\n" for folder in empty_dirs())
    + """n=0
for path in $image; do
  n=$((n + 1)); mkdir -p "$path"; mount --move /mnt/.image/$n "$path"; mount -o remount,bind,ro "$path"
done
unset IFS
rmdir /mnt/.image/* /mnt/.image
mount -o remount,bind,ro /mnt
mount -o remount,bind,ro /
cd /
exec setpriv --reuid=UID --regid=0 --clear-groups env -u HOME "$@"
""".replace("UID", str(UID))
)


@dataclass(frozen=True)
class Deployment:
    repository: Path
    stub_python: Path  # the stand-in for the image's Python that its environments were built for


def in_container(deployment: Deployment, concepts: Path) -> List[str]:
    """What runs a command as the runtime's container runs it (CONTAINER); this Python's installation (the
    stubs' libpython and standard library), the virtualenv (the wheel's tritonserver, which a checkout in /tmp
    would otherwise leave under the /tmp emptyDir) and the stand-in are the image's."""
    image = ":".join(dict.fromkeys([sys.base_prefix, sys.prefix, str(deployment.stub_python.parent.parent)]))
    paths = [str(deployment.repository), str(concepts), image]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", CONTAINER, "sh", *paths]


def replica(deployment: Deployment, concepts: Path) -> TritonServer:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    return TritonServer(
        Path(MODELS),
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        arguments=runtime_arguments(ports),
        wrapper=[*in_container(deployment, concepts), *key_check(secret_key())],
    )


def concept_file(version: int, names: List[str], dim: int) -> str:
    rng = np.random.default_rng(version)
    concepts = tuple(
        concept_set.make_concept(name, rng.standard_normal(dim), -1.0, {"kind": "text", "text": f"a {name}"})
        for name in names
    )
    return concept_writer.dumps(concept_set.ConceptSet(version=version, embedding_dim=dim, concepts=concepts))


@pytest.fixture(scope="module")
def deployed(parity_set, tmp_path_factory) -> Deployment:
    """The repository exported as the KServe guide says (the custom concept set read from /mnt/concepts), with
    its environments built for the stand-in of the image's Python: the stubs see nothing of this venv."""
    stub_python = image_python.build(tmp_path_factory.mktemp("image-python"))
    target = tmp_path_factory.mktemp("mnt-models") / "repository"
    result = run_export(parity_set.checker_dir, target, "--concepts-dir", CONCEPTS, "--stub-python", str(stub_python))
    assert result.returncode == 0, result.stderr
    return Deployment(target, stub_python)


def test_runtime_arguments_load_and_answer_with_admin_apis_restricted(deployed, parity_set, tmp_path):
    concepts = tmp_path / "concepts"
    configmap_volume(concepts, {spec.CUSTOM_CONCEPTS_FILENAME: concept_file(3, ["logo"], 16)}, "2026_11_30_12_00_00.1")
    with replica(deployed, concepts) as server:
        with SafetyCheckerClient(server.grpc_url) as client:
            (answer,) = client.check_batch(parity_set.pixels[:1])
        assert answer.concept_set_version == 3 and list(answer.custom_scores) == ["logo"]
        assert answer.custom_scores["logo"] > 0 and answer.flagged  # threshold -1 fires on every image
        # Served as restricted-v2 runs it: its uid in group 0, no HOME; the Python backend unpacked every
        # environment into the /tmp emptyDir.
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{UID}\s", status, re.M) and re.search(r"^Gid:\s+0\s", status, re.M), status
        assert not [e for e in Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0") if e.startswith(b"HOME=")]
        unpacked = list(Path(f"/proc/{server.pid}/root/tmp").glob("python_env_*/*/bin/activate"))
        assert len(unpacked) == len(list(deployed.repository.glob("*/python_env.tar.gz"))) > 0

        base, key = f"http://{server.http_url}", secret_key()

        def status(method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None) -> int:
            request = urllib.request.Request(base + path, data=body or None, method=method, headers=headers or {})
            try:
                with _HTTP.open(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        admin = [
            ("GET", "/v2/logging"),
            ("POST", "/v2/logging"),
            ("GET", "/v2/trace/setting"),
            ("GET", "/v2/systemsharedmemory/status"),
            ("POST", "/v2/repository/index"),
        ]
        for method, path in admin:
            body = b"{}" if method == "POST" else b""
            assert status(method, path, body) == 403, path
            assert status(method, path, body, {KEY_HEADER: "wrong"}) == 403, path
        assert status("POST", "/v2/logging", b'{"log_verbose_level": 0}', {KEY_HEADER: key}) == 200
        for _, path in admin[:3] + [("", "/v2/systemsharedmemory/status")]:
            assert status("GET", path, headers={KEY_HEADER: key}) == 200, path
        assert status("POST", "/v2/repository/index", b"{}", {KEY_HEADER: key}) == 200
        # Inference, health, metadata and statistics stay open.
        for path in (
            "/v2/health/ready",
            "/v2/health/live",
            "/v2",
            f"/v2/models/{spec.ENSEMBLE_MODEL}",
            f"/v2/models/{spec.ENSEMBLE_MODEL}/stats",
        ):
            assert status("GET", path) == 200, path

        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            grpc.get_log_settings()
        with pytest.raises(InferenceServerException):
            grpc.get_system_shared_memory_status()
        assert grpc.get_log_settings(headers={GRPC_KEY_HEADER: key}) is not None
        assert grpc.get_system_shared_memory_status(headers={GRPC_KEY_HEADER: key}) is not None
        assert grpc.is_server_ready()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=30).read()
        assert b"nv_inference_queue_duration_us" in metrics and b"nv_inference_request_success" in metrics


def test_a_model_importing_what_the_image_lacks_fails_to_load_in_the_container(deployed, tmp_path):
    """The restriction bites: a model that imports PyYAML, which this venv and this host's system Python have but
    neither the image's Python nor the model's environment, does not load in the container, and says why."""
    assert importlib.util.find_spec("yaml") is not None  # this process sees it
    repository = tmp_path / "repository"
    shutil.copytree(deployed.repository, repository, symlinks=True)
    model = repository / spec.POSTPROCESS_MODEL / "1" / "model.py"
    model.write_text("import yaml  # noqa: F401\n" + model.read_text())
    concepts = tmp_path / "concepts"
    configmap_volume(concepts, {spec.CUSTOM_CONCEPTS_FILENAME: concept_file(1, [], 16)}, "2026_11_30_12_00_00.1")
    server = replica(Deployment(repository, deployed.stub_python), concepts)
    with pytest.raises(ServerError, match="exited with code 1"):
        server.start(timeout_s=HUNG_S)
    log = server.log_path.read_text()
    assert "No module named 'yaml'" in log and spec.POSTPROCESS_MODEL in log, log[-3000:]


def test_two_replicas_follow_one_configmap_swap_under_load(deployed, parity_set, tmp_path):
    """Two replicas read one ConfigMap-laid-out folder; after the kubelet-style swap of `..data` both serve the new
    version, and no request fails while they change over."""
    concepts = tmp_path / "concepts"
    configmap_volume(concepts, {spec.CUSTOM_CONCEPTS_FILENAME: concept_file(1, [], 16)}, "2026_11_30_12_00_00.1")
    pixels = parity_set.pixels[:2]
    with replica(deployed, concepts) as first, replica(deployed, concepts) as second:
        servers = [first, second]
        failures: List[str] = []
        replicas = (0, 1, 0, 1)  # two client threads per replica
        seen: List[List[int]] = [[] for _ in replicas]  # per thread: its own answers are ordered in time
        stop = threading.Event()

        def load(thread: int) -> None:
            index = replicas[thread]
            with SafetyCheckerClient(servers[index].grpc_url) as client:
                deadline = time.monotonic() + 120  # bounded, whatever happens
                while not stop.is_set() and time.monotonic() < deadline:
                    try:
                        versions = {r.concept_set_version for r in client.check_batch(pixels)}
                    except Exception as error:
                        failures.append(f"replica {index}: {error}")
                        continue
                    assert len(versions) == 1, versions  # a request is answered wholly under one set
                    seen[thread].append(versions.pop())

        def latest(index: int) -> List[int]:
            return [answers[-1] for thread, answers in enumerate(seen) if replicas[thread] == index and answers]

        threads = [threading.Thread(target=load, args=(thread,)) for thread in range(len(replicas))]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(seen):  # every thread answered under version 1
                time.sleep(0.2)
            new = concept_file(2, ["logo", "gore"], 16)
            configmap_volume(concepts, {spec.CUSTOM_CONCEPTS_FILENAME: new}, "2026_11_30_12_05_00.2")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(latest(i) and set(latest(i)) == {2} for i in (0, 1)):
                time.sleep(0.2)
            time.sleep(1.0)  # keep the load on after the change-over
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert failures == []
    for thread, answers in enumerate(seen):
        # Answers on one connection arrive in order, so each thread sees 1 ... 1 2 ... 2: once over, never back.
        assert answers[0] == 1 and answers[-1] == 2, (thread, answers[:3], answers[-3:])
        assert answers == sorted(answers), (thread, [b for a, b in zip(answers, answers[1:]) if a != b])


def transformer(grpc_port: int, http_port: int, key_file: Path) -> subprocess.Popen:
    """The InferenceService's transformer: its `command` with the arguments KServe appends to a transformer's
    (`--model_name`, `--predictor_host`, `--http_port`), under its env; substituted: the ports and the key's path,
    and this venv's bin for the image's PATH (where `safety-checker` is)."""
    (container,) = manifest("inferenceservice-s3.yaml")["spec"]["transformer"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(TRITON_GRPC_PORT=str(grpc_port), GATEWAY_API_KEY_FILE=str(key_file))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    kserve = ["--model_name", "safety-checker", "--predictor_host", "127.0.0.1", "--http_port", str(http_port)]
    return subprocess.Popen([*container["command"], *kserve], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_the_transformer_answers_the_seed_body_in_front_of_the_runtime(deployed, encoded_files, tmp_path):
    """Issue 19: the seed runtime's callers reach the checker unchanged through the transformer, which speaks
    gRPC to the runtime's own command line: the studio's body with its Bearer token gets Triton's decision."""
    import base64

    import requests
    from gateway_fixtures import studio_body

    concepts = tmp_path / "concepts"
    configmap_volume(concepts, {spec.CUSTOM_CONCEPTS_FILENAME: concept_file(1, [], 16)}, "2026_11_30_12_00_00.1")
    key = secrets.token_hex(16)
    (tmp_path / "key").write_text(key + "\n")  # as a Secret volume holds it
    name = next(n for n in sorted(encoded_files) if n.endswith(".png") and not n.startswith(("animated", "hidden")))
    image = encoded_files[name].read_bytes()
    port = free_port()
    with replica(deployed, concepts) as server:
        with SafetyCheckerClient(server.grpc_url, encoded=True) as client:
            (expected,) = client.check_encoded([image])
        gateway = transformer(server.ports["gRPC"], port, tmp_path / "key")
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.get(url + "/v2/health/ready", timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    assert gateway.poll() is None, gateway.stdout.read().decode()
                assert time.monotonic() < deadline, "the transformer did not get ready"
                time.sleep(0.2)
            body = studio_body(base64.b64encode(image).decode())
            infer = url + "/v2/models/safety-checker/infer"
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            answer = requests.post(infer, data=body, headers=headers, timeout=120)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_name"] == "safety-checker"
            assert answer.json()["outputs"][0]["data"] == [expected.flagged]
            assert requests.post(infer, data=body, headers={"Authorization": "Bearer x"}, timeout=60).status_code == 401
        finally:
            gateway.terminate()
            output = gateway.communicate(timeout=30)[0].decode()
    assert "Traceback" not in output and key not in output, output


def test_concepts_export_emits_the_configmap(tmp_path):
    """`safety-checker concepts export --configmap NAME` writes the ConfigMap every replica mounts."""
    from test_deploy_manifests import problems

    folder = tmp_path / "concepts"
    folder.mkdir()
    (folder / spec.CUSTOM_CONCEPTS_FILENAME).write_text(concept_file(4, ["logo"], 16))
    command = [
        str(ROOT / ".venv" / "bin" / "safety-checker"),
        "concepts",
        "export",
        "--concepts-dir",
        str(folder),
        "--configmap",
        "safety-checker-concepts",
        "--namespace",
        "guardrails",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    configmap = yaml.safe_load(result.stdout)
    assert problems(configmap) == []
    assert configmap["metadata"] == {"name": "safety-checker-concepts", "namespace": "guardrails"}
    text = configmap["data"][spec.CUSTOM_CONCEPTS_FILENAME]
    assert text == (folder / spec.CUSTOM_CONCEPTS_FILENAME).read_text()
    assert concept_set.parse(text.encode(), embedding_dim=16).version == 4
    assert re.search(r"kubectl apply", result.stderr)
    # An invalid set is never exported.
    (folder / spec.CUSTOM_CONCEPTS_FILENAME).write_text(
        json.dumps({"format_version": 1, "version": "x", "embedding_dim": 16, "concepts": []})
    )
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stdout == "" and "version" in refused.stderr


def test_concept_commands_write_a_concepts_dir_without_waiting(server, tmp_path):
    """`--concepts-dir` edits the folder a ConfigMap is made from; `--no-wait` does not wait for a server that only
    sees the change once the ConfigMap is applied."""
    from PIL import Image

    folder = tmp_path / "concepts"
    folder.mkdir()
    (folder / spec.CUSTOM_CONCEPTS_FILENAME).write_text(concept_file(0, [], 16))
    picture = tmp_path / "logo.png"
    Image.fromarray((np.arange(96 * 64 * 3) * 7 % 256).astype(np.uint8).reshape(96, 64, 3)).save(picture)
    command = str(ROOT / ".venv" / "bin" / "safety-checker")
    added = subprocess.run(
        [command, "concepts", "add", "--concepts-dir", str(folder), "--url", server.grpc_url, "--no-wait",
         "--name", "logo", "--image", str(picture)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "now serves" not in added.stdout  # it did not wait for the server
    written = concept_set.read(folder / spec.CUSTOM_CONCEPTS_FILENAME)
    assert written.version == 1 and written.names == ["logo"]
    listed = subprocess.run([command, "concepts", "list", "--concepts-dir", str(folder), "--json"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(listed.stdout)["concepts"][0]["name"] == "logo"
    both = subprocess.run([command, "concepts", "list", "--concepts-dir", str(folder), "--repository", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    text = subprocess.run(
        [command, "concepts", "add", "--concepts-dir", str(folder), "--url", server.grpc_url, "--no-wait",
         "--name", "gore", "--text", "gore"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert text.returncode == 1 and "give --threshold" in text.stderr


def test_export_refuses_a_relative_concepts_dir(tmp_path):
    from export.cli import main

    assert main(["--repository", str(tmp_path / "repository"), "--concepts-dir", "concepts"]) == 2
    assert not (tmp_path / "repository").exists()


def probe_command(runtime: str, probe: str, port: int) -> List[str]:
    """A runtime's exec probe as the kubelet runs it in the container, with only the port substituted (and this
    interpreter for the image's python3: the probe needs the standard library only)."""
    (container,) = manifest(runtime)["spec"]["containers"]
    command = list(container[probe]["exec"]["command"])
    assert command[0] == "python3"
    command[0] = sys.executable
    command[command.index("--port") + 1] = str(port)
    return command


def test_the_exec_probes_fail_on_a_dead_stub_and_a_restart_restores_the_replica(deployed, parity_set, tmp_path):
    """Finding 2 on KServe: /v2/health/ready stays green when a stub dies, the runtime's readiness and liveness
    probes (a real inference) fail (each gives up before the kubelet's timeoutSeconds: its --timeout is below it,
    test_deploy_manifests.py); the kubelet then restarts the container (emulated here, with the liveness probe's
    failure threshold), and the replica answers again."""
    concepts = tmp_path / "concepts"
    configmap_volume(concepts, {spec.CUSTOM_CONCEPTS_FILENAME: concept_file(1, [], 16)}, "2026_11_30_12_00_00.1")
    server = replica(deployed, concepts)
    server.start()
    try:
        (container,) = manifest("servingruntime-cpu.yaml")["spec"]["containers"]
        port = server.ports["HTTP"]

        def run(probe: str) -> subprocess.CompletedProcess:
            command = in_container(deployed, concepts) + probe_command("servingruntime-cpu.yaml", probe, port)
            return subprocess.run(command, capture_output=True, text=True, timeout=HUNG_S)

        for probe in ("readinessProbe", "livenessProbe"):
            result = run(probe)
            assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stdout + result.stderr
        stubs = running(child_processes(server.pid), f"/{spec.EMBEDDER_MODEL}/1/model.py")
        assert len(stubs) == 1, stubs
        os.kill(stubs[0], signal.SIGKILL)
        with _HTTP.open(f"http://{server.http_url}/v2/health/ready", timeout=10) as response:
            assert response.status == 200  # what an httpGet probe would still see
        readiness = run("readinessProbe")
        assert readiness.returncode == 1 and "not healthy" in readiness.stdout, readiness.stdout
        liveness = container["livenessProbe"]
        failures = [run("livenessProbe").returncode for _ in range(liveness["failureThreshold"])]
        assert failures == [1] * liveness["failureThreshold"]
        server.kill()  # the kubelet restarts the container
        server.start()
        assert run("readinessProbe").returncode == 0
        with SafetyCheckerClient(server.grpc_url) as client:
            assert len(client.check_batch(parity_set.pixels[:2])) == 2
    finally:
        server.stop()
