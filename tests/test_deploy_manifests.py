"""deploy/kserve: every manifest validates offline against its schema, and says what the deployment needs.

Schemas are the vendored ones in deploy/kserve/schemas/ (KServe's and
KEDA's CRD openAPIV3Schemas, OpenShift's published OpenAPI for Template, a
hand-written one for ConfigMap; provenance in its README). The validator reads them as the API
server does with kubectl's default strict field validation: `nullable`,
`x-kubernetes-int-or-string`, `x-kubernetes-list-type` (set / map with its
keys) and int32/int64 formats are enforced, and a field a schema does not
declare is an error unless the schema preserves unknown fields. Every
manifest's `metadata` is checked against objectmeta.json (the CRDs leave it
to the API server). The content tests fail when a requirement of the
deployment (issue 10) is dropped; the last tests break copies of the
manifests and expect the validator to say so.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml
from jsonschema import Draft7Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError

from deploy import render
from safety_checker_admin.command_line import MALLOC_ENVIRONMENT
from safety_checker_admin.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kserve"
SCHEMAS = DEPLOY / "schemas"

SCHEMA_FILES = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.v1beta1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.v1alpha1.json",
    ("v1", "ConfigMap"): "configmap.v1.json",
    ("template.openshift.io/v1", "Template"): "template.v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.v1alpha1.json",
}

ADMIN_APIS = {"model-repository", "logging", "trace", "shared-memory"}
# Triton 2.51's restricted categories (src/command_line_parser.cc, r24.10).
TRITON_CATEGORIES = {
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
}
GPU = "nvidia.com/gpu"


# -- the validator --------------------------------------------------------------
def _type(validator, types, instance, schema):
    """`nullable: true` (OpenAPI) lets null through whatever the type."""
    if instance is None and schema.get("nullable"):
        return
    yield from Draft7Validator.VALIDATORS["type"](validator, types, instance, schema)


def _int_or_string(validator, value, instance, schema):
    if value and not (isinstance(instance, str) or (isinstance(instance, int) and not isinstance(instance, bool))):
        yield ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator, list_type, instance, schema):
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen = {}
        for index, item in enumerate(instance):
            key = json.dumps(item, sort_keys=True)
            if key in seen:
                yield ValidationError(f"items {seen[key]} and {index} are equal in a list of type set")
            seen.setdefault(key, index)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        declared = (schema.get("items") or {}).get("properties", {})
        seen = {}
        for index, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            # A key left out takes its schema default (containerPort 8000 = containerPort 8000, protocol TCP).
            key = tuple(item.get(name, declared.get(name, {}).get("default")) for name in keys)
            if key in seen:
                yield ValidationError(
                    f"items {seen[key]} and {index} have the same {'/'.join(keys)} {key} in a list of type map"
                )
            seen.setdefault(key, index)


def _properties(validator, properties, instance, schema):
    """Declared properties as usual; an undeclared one is an error unless the schema allows it."""
    yield from Draft7Validator.VALIDATORS["properties"](validator, properties, instance, schema)
    if not isinstance(instance, dict):
        return
    if "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    for name in instance:
        if name not in properties:
            yield ValidationError(f"unknown field {name!r} (declared: {', '.join(sorted(properties))})")


FORMATS = FormatChecker()


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


KubernetesValidator = validators.extend(
    Draft7Validator,
    {
        "type": _type,
        "properties": _properties,
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-list-type": _list_type,
    },
)


@cache
def schema(name: str) -> Dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


@cache
def validator_for(name: str):
    Draft7Validator.check_schema(schema(name))
    return KubernetesValidator(schema(name), format_checker=FORMATS)


def problems(doc: Dict[str, Any], schemas: Optional[Dict[Tuple[str, str], str]] = None) -> List[str]:
    """Every schema violation of one resource (and of the resources a Template holds), as readable lines; `schemas`
    maps (apiVersion, kind) to a schema file (default SCHEMA_FILES, the kinds of this folder's top level)."""
    schemas = SCHEMA_FILES if schemas is None else schemas
    kind = (doc.get("apiVersion"), doc.get("kind"))
    if kind not in schemas:
        return [f"no schema for apiVersion {kind[0]!r} kind {kind[1]!r}"]
    found = []
    # The API server allows apiVersion, kind and metadata at the root of any custom resource, declared or not.
    declared = schema(schemas[kind]).get("properties", {})
    body = {k: v for k, v in doc.items() if k in declared or k not in ("apiVersion", "kind", "metadata")}
    for name, instance, where in ((schemas[kind], body, ""), ("objectmeta.json", doc.get("metadata"), "metadata")):
        for error in validator_for(name).iter_errors(instance):
            path = "/".join(str(p) for p in ([where] if where else []) + list(error.absolute_path))
            found.append(f"{doc.get('kind')} {path or '(top)'}: {error.message}")
    if doc.get("kind") == "Template":
        for index, inner in enumerate(doc.get("objects") or []):
            found += [f"objects/{index}: {line}" for line in problems(inner, schemas)]
    return found


# -- the manifests ----------------------------------------------------------------
def manifest_files() -> List[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def load(name: str) -> Dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one resource, found {len(docs)}"
    return docs[0]


def kserve_container(runtime: Dict[str, Any]) -> Dict[str, Any]:
    containers = runtime["spec"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"], "one container, named as KServe expects"
    return containers[0]


def flags(args: List[str]) -> Dict[str, List[str]]:
    """--name=value arguments of a tritonserver command line, by name (a flag may repeat)."""
    assert args[0] == "tritonserver", f"the command line must start with tritonserver: {args[:1]}"
    parsed: Dict[str, List[str]] = {}
    for arg in args[1:]:
        match = re.fullmatch(r"--([a-z][a-z0-9-]*)=(.+)", arg)
        assert match, f"not a --flag=value argument: {arg!r}"
        parsed.setdefault(match.group(1), []).append(match.group(2))
    return parsed


def one(parsed: Dict[str, List[str]], name: str) -> str:
    assert len(parsed.get(name, [])) == 1, f"--{name} must be given exactly once: {parsed.get(name)}"
    return parsed[name][0]


def restricted(value: str) -> Tuple[set, str, str]:
    """Split `<apis>:<header>=<value>` exactly as Triton's ParseGenericConfigOption does (first ':', then '=')."""
    colon = value.find(":")
    equals = value.find("=", colon + 1)
    assert colon > 0 and equals > colon + 1 and equals < len(value) - 1, f"not <apis>:<key>=<value>: {value!r}"
    return set(value[:colon].split(",")), value[colon + 1 : equals], value[equals + 1 :]


def volume_for(runtime: Dict[str, Any], mount_path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    container = kserve_container(runtime)
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"{runtime['metadata']['name']}: nothing (or more than one) mounted at {mount_path}"
    volumes = [v for v in runtime["spec"].get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, f"{runtime['metadata']['name']}: no volume {mounts[0]['name']!r}"
    return mounts[0], volumes[0]


def compose_triton_image() -> str:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["triton"]["image"]
    match = re.fullmatch(r"\$\{TRITON_IMAGE:-([^}]+)\}", image)
    return match.group(1) if match else image


def gpu_requests(resources: Dict[str, Any]) -> List[Any]:
    return [
        section.get(GPU) for section in (resources.get("requests", {}), resources.get("limits", {})) if GPU in section
    ]


RUNTIMES = ["servingruntime-gpu.yaml", "servingruntime-cpu.yaml"]
ISVCS = ["inferenceservice-s3.yaml", "inferenceservice-pvc.yaml", "inferenceservice-cpu.yaml"]


# -- schema validation ------------------------------------------------------------
def test_every_manifest_has_a_schema_and_the_folder_has_them_all():
    kinds = sorted((load(p.name)["apiVersion"], load(p.name)["kind"]) for p in manifest_files())
    assert set(kinds) == set(SCHEMA_FILES), f"manifests cover {kinds}, schemas {sorted(SCHEMA_FILES)}"
    for name in list(SCHEMA_FILES.values()) + ["objectmeta.json"]:
        assert (SCHEMAS / name).is_file(), name


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_its_schema(path):
    found = problems(load(path.name))
    assert not found, f"{path.name}:\n  " + "\n  ".join(found)


def test_crd_schemas_are_the_vendored_kserve_ones():
    isvc, runtime = schema("inferenceservice.v1beta1.json"), schema("servingruntime.v1alpha1.json")
    assert "predictor" in isvc["properties"]["spec"]["required"]
    assert {"minReplicas", "maxReplicas", "model"} <= set(
        isvc["properties"]["spec"]["properties"]["predictor"]["properties"]
    )
    assert runtime["properties"]["spec"]["required"] == ["containers"]
    readme = (SCHEMAS / "README.md").read_text()
    assert "aaac4e294dae2c7b1aa1886447793f3aa1c30912" in readme, "provenance (KServe commit) recorded"
    assert "hand-written" in readme.lower()


# -- the runtimes -------------------------------------------------------------------
@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_image_is_the_compose_triton_image(name):
    assert kserve_container(load(name))["image"] == compose_triton_image() == "nvcr.io/nvidia/tritonserver:24.10-py3"


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_command_line(name):
    parsed = flags(kserve_container(load(name))["args"])
    assert one(parsed, "model-repository") == "/mnt/models"
    assert one(parsed, "strict-readiness") == "true"
    assert one(parsed, "model-control-mode") == "none"
    assert one(parsed, "exit-on-error") == "true"
    # Every flag this project relies on is one tritonserver 2.51 knows (its --help, checked by hand).
    known = {
        "model-repository",
        "model-config-name",
        "model-control-mode",
        "strict-readiness",
        "exit-on-error",
        "exit-timeout-secs",
        "http-port",
        "grpc-port",
        "metrics-port",
        "allow-metrics",
        "grpc-infer-allocation-pool-size",
        "http-restricted-api",
        "grpc-restricted-protocol",
        "log-verbose",
    }
    assert set(parsed) <= known, f"unexpected flags {set(parsed) - known}"


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_ports_and_probes(name):
    runtime = load(name)
    container = kserve_container(runtime)
    parsed = flags(container["args"])
    http, grpc, metrics = (int(one(parsed, f)) for f in ("http-port", "grpc-port", "metrics-port"))
    assert (http, grpc, metrics) == (8000, 8001, 8002)
    ports = {p["containerPort"]: p for p in container["ports"]}
    assert container["ports"][0]["containerPort"] == http, "KServe exposes the first port as the service port"
    assert ports[grpc]["name"] == "h2c", "gRPC is HTTP/2 cleartext: KServe and Knative know it by the name h2c"
    assert ports[http]["name"] == "http1"
    assert metrics in ports
    assert {p.get("protocol", "TCP") for p in container["ports"]} == {"TCP"}

    get = container["startupProbe"]["httpGet"]
    assert (get["path"], get["port"]) == ("/v2/health/ready", http), f"startupProbe -> {get}"
    # Readiness and liveness run a real inference (health_probe.py at the repository root): Triton's own
    # /v2/health/ready stays green when a Python stub has died.
    repository = one(parsed, "model-repository")
    for name in ("readinessProbe", "livenessProbe"):
        probe = container[name]
        assert "httpGet" not in probe, f"{name} must run an inference, not only ask /v2/health"
        command = probe["exec"]["command"]
        assert command[:2] == ["python3", f"{repository}/health_probe.py"], command
        options = dict(zip(command[2::2], command[3::2]))
        assert options["--port"] == str(http), command
        assert float(options["--timeout"]) < probe["timeoutSeconds"], "the probe gives up before the kubelet does"
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    # A dead stub fails the probe at once: not ready within one period (5 s), restarted after two failures.
    assert readiness["periodSeconds"] <= 5 and readiness["failureThreshold"] == 1, readiness
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 30, liveness
    startup = container["startupProbe"]
    allowance = startup["periodSeconds"] * startup["failureThreshold"]
    # GPU: a TensorRT engine build for batch 1..32 on every new pod (the 30 minutes the runtime states).
    assert allowance >= (1800 if name.endswith("gpu.yaml") else 300), f"start-up allowance {allowance} s"


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_security_context_and_volumes(name):
    runtime = load(name)
    container = kserve_container(runtime)
    security = container["securityContext"]
    # Issue 20: any uid OpenShift's restricted-v2 SCC chooses (tests/test_deploy_runtime.py serves the runtime's
    # arguments as one, in group 0, with no HOME), and a read-only root filesystem.
    assert security == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # It writes only to emptyDirs (the runtime test mounts an empty folder for each): the Python backend unpacks
    # the models' environments into /tmp, its shared memory is in /dev/shm; the GPU's TensorRT engine cache.
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly", False)}
    assert writable == {"/tmp", "/dev/shm"} | ({"/trt-cache"} if "gpu" in name else set()), writable
    for folder in writable:
        assert volume_for(runtime, folder)[1]["emptyDir"]["sizeLimit"], folder

    mount, volume = volume_for(runtime, "/dev/shm")
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]

    mount, volume = volume_for(runtime, "/mnt/concepts")
    assert volume["configMap"]["name"] == load("concepts-configmap.yaml")["metadata"]["name"]
    assert "subPath" not in mount, "a subPath mount never sees the ConfigMap's ..data swap"
    assert not volume["configMap"].get("optional", False)


def test_gpu_runtime_engine_cache_is_where_the_embedder_writes_it():
    runtime = load("servingruntime-gpu.yaml")
    mount, volume = volume_for(runtime, "/trt-cache")
    assert not mount.get("readOnly", False)
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    # Whichever embedder configuration uses TensorRT writes its engines there.
    embedder = ROOT / "model_repository" / "safety_checker_embedder"
    paths = set()
    for config in [embedder / "config.pbtxt", *sorted((embedder / "configs").glob("*.pbtxt"))]:
        paths |= set(re.findall(r'key: "trt_(?:engine|timing)_cache_path" value: "([^"]*)"', config.read_text()))
    assert paths == {"/trt-cache"}


def test_gpu_and_cpu_runtimes_differ_only_where_they_must():
    gpu, cpu = load("servingruntime-gpu.yaml"), load("servingruntime-cpu.yaml")
    gpu_args, cpu_args = kserve_container(gpu)["args"], kserve_container(cpu)["args"]
    assert "--model-config-name=cpu" in cpu_args and not any(a.startswith("--model-config-name") for a in gpu_args)
    assert [a for a in cpu_args if a != "--model-config-name=cpu"] == gpu_args

    assert gpu_requests(kserve_container(gpu)["resources"]) == ["1", "1"]
    assert gpu_requests(kserve_container(cpu)["resources"]) == []
    assert not any(GPU in json.dumps(t) for t in cpu["spec"].get("tolerations", []))
    assert "opendatahub.io/recommended-accelerators" not in cpu["metadata"].get("annotations", {})
    for key in ("readinessProbe", "livenessProbe", "securityContext", "ports"):
        assert kserve_container(gpu)[key] == kserve_container(cpu)[key], key
    # The CPU configs' onnxruntime comes with the repository: nothing is added to the image's Python path.
    for runtime in (gpu, cpu):
        assert not {"PYTHONPATH", "PYTHONHOME"} & {e["name"] for e in kserve_container(runtime)["env"]}
    assert [v for v in gpu["spec"]["volumes"] if v["name"] != "trt-cache"] == cpu["spec"]["volumes"]


@pytest.mark.parametrize("name", RUNTIMES)
def test_admin_apis_are_restricted_with_the_key_from_the_secret(name):
    container = kserve_container(load(name))
    parsed = flags(container["args"])
    secret_name, secret_key = created_secret()
    env = {e["name"]: e for e in container["env"]}
    for flag in ("http-restricted-api", "grpc-restricted-protocol"):
        apis, header, value = restricted(one(parsed, flag))
        assert ADMIN_APIS <= apis <= TRITON_CATEGORIES, f"--{flag}: {sorted(apis)}"
        # The probes and every client need these open.
        assert not apis & {"health", "inference", "metadata"}, f"--{flag} restricts {apis}"
        assert header == "admin-key"
        match = re.fullmatch(r"\$\((\w+)\)", value)
        assert match, f"--{flag}: the key must come from an env var, not be written into the manifest: {value!r}"
        reference = env[match.group(1)]["valueFrom"]["secretKeyRef"]
        assert (reference["name"], reference["key"]) == (secret_name, secret_key)


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_model_format_prometheus_and_openshift_ai_annotations(name):
    runtime = load(name)
    formats = runtime["spec"]["supportedModelFormats"]
    assert {"name": "triton", "version": "2"}.items() <= next(f for f in formats if f["name"] == "triton").items()
    pod = runtime["spec"]["annotations"]
    assert pod["prometheus.io/scrape"] == "true"
    assert pod["prometheus.io/port"] == one(flags(kserve_container(runtime)["args"]), "metrics-port") == "8002"
    assert pod["prometheus.io/path"] == "/metrics"
    # "true" would make KServe's webhook point prometheus.io/port at a Knative queue-proxy (RawDeployment has none).
    assert pod["serving.kserve.io/enable-prometheus-scraping"] == "false"
    assert (pod["prometheus.kserve.io/port"], pod["prometheus.kserve.io/path"]) == ("8002", "/metrics")
    meta = runtime["metadata"]["annotations"]
    assert meta["openshift.io/display-name"]
    assert meta["opendatahub.io/apiProtocol"] == "REST"


def test_gpu_runtime_openshift_ai_accelerator_annotations():
    runtime = load("servingruntime-gpu.yaml")
    meta = runtime["metadata"]["annotations"]
    assert json.loads(meta["opendatahub.io/recommended-accelerators"]) == [GPU]
    assert "opendatahub.io/accelerator-name" in meta
    assert next(f for f in runtime["spec"]["supportedModelFormats"] if f["name"] == "triton")["autoSelect"] is True


def test_template_wraps_the_gpu_runtime_for_the_dashboard():
    template = load("template.yaml")
    annotations = template["metadata"]["annotations"]
    assert json.loads(annotations["opendatahub.io/modelServingSupport"]) == ["single"]
    assert annotations["opendatahub.io/apiProtocol"] == "REST"
    assert template["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    assert template["objects"] == [load("servingruntime-gpu.yaml")], "template.yaml drifted from the runtime"


def test_the_committed_files_hold_the_rendered_command_line():
    """docker-compose.yml and the runtimes hold what `python -m deploy.render` writes from
    safety_checker_admin.command_line (the launcher's own), and the template its GPU runtime."""
    for path, text in render.rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is out of date: run python -m deploy.render"


def test_every_deployment_runs_the_launchers_command_line():
    """The same flags wherever tritonserver runs; only the bundled server binds an address of its own."""
    launcher = TritonServer(ROOT, model_config_name=None).tritonserver_arguments
    own = {"http-address", "grpc-address", "metrics-address"}
    expected = set(flags(["tritonserver", *launcher])) - own
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["triton"]
    restricted_in_entrypoint = {"http-restricted-api", "grpc-restricted-protocol"}
    assert set(flags(compose["command"])) | restricted_in_entrypoint == expected | {"model-config-name"}
    for flag in restricted_in_entrypoint:
        assert f'--{flag}="$$restricted"' in compose["entrypoint"][2]
    for name in RUNTIMES:
        parsed = flags(kserve_container(load(name))["args"])
        assert set(parsed) - {"model-config-name"} == expected, name
    env = {e["name"]: e.get("value") for e in kserve_container(load("servingruntime-cpu.yaml"))["env"]}
    assert {name: env[name] for name in MALLOC_ENVIRONMENT} == dict(MALLOC_ENVIRONMENT)
    assert {name: compose["environment"][name] for name in MALLOC_ENVIRONMENT} == dict(MALLOC_ENVIRONMENT)


# -- InferenceServices, autoscaling, concept set, secret ---------------------------------
@pytest.mark.parametrize("name", ISVCS)
def test_inference_service(name):
    isvc = load(name)
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    runtimes = {load(r)["metadata"]["name"]: r for r in RUNTIMES}
    assert model["runtime"] in runtimes
    assert model["modelFormat"] == {"name": "triton", "version": "2"}
    assert model["protocolVersion"] == "v2"
    assert isinstance(predictor["minReplicas"], int) and isinstance(predictor["maxReplicas"], int)
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] in ("keda", "external")
    uri = model["storageUri"]
    assert re.fullmatch(r"(s3|pvc)://[a-z0-9][-a-z0-9.]*/[^\s]+", uri), uri
    if uri.startswith("s3://"):
        assert model["storage"]["key"], "credentials for s3:// come from the data connection storage.key names"
        assert predictor["serviceAccountName"], "the pods run under the project's service account"
    gpu = runtimes[model["runtime"]].endswith("gpu.yaml")
    resources = model.get("resources") or kserve_container(load(runtimes[model["runtime"]]))["resources"]
    assert gpu_requests(resources) == (["1", "1"] if gpu else [])


def test_both_storage_examples_are_there():
    uris = {load(name)["spec"]["predictor"]["model"]["storageUri"].split("://")[0] for name in ISVCS}
    assert {"s3", "pvc"} <= uris


def test_the_repository_carries_onnxruntime_for_the_cpu_configs_and_no_pod_installs_it():
    """Issue 20: the CPU configs' runner imports onnxruntime, which the NGC image lacks; the models that run it
    name it, so the export packs it into their environments (tests/test_environment.py checks the archive), and
    no InferenceService has an init container."""
    from export.models import Settings, served_models
    from export.parameters import ONNX_FILE

    models = served_models(Settings(cascade=True))
    runners = [m for m in models if any(ONNX_FILE in v.parameters for v in m.variants if v.backend == "python")]
    assert {m.name for m in runners} >= {"safety_checker_embedder", "safety_checker_normalize"}
    for model in models:
        assert ("onnxruntime" in model.requirements) == (model in runners), model.name
    for name in ISVCS:
        assert "initContainers" not in load(name)["spec"]["predictor"], name


def shipped_manifests() -> List[Path]:
    """Every Kubernetes manifest this project ships, and docker-compose.yml."""
    kubernetes = sorted(p for p in (ROOT / "deploy").rglob("*.yaml") if "schemas" not in p.parts)
    return [*kubernetes, ROOT / "docker-compose.yml"]


def nodes(node: Any, where: Tuple[Any, ...] = ()) -> Iterator[Tuple[Tuple[Any, ...], Any]]:
    yield where, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from nodes(value, (*where, key))


INSTALLS = re.compile(r"\b(?:pip3?|-m pip|conda|mamba|apt-get|apt|dnf|yum|microdnf|apk)\s+(?:install|add)\b")


def pod_start_problems(doc: Any, kubernetes: bool = True) -> List[str]:
    """Where a manifest fixes a uid or a group for files, has an init container, or (a Kubernetes one) installs
    packages: a pod must start from the image and the repository alone, as any uid."""
    found = []
    for where, node in nodes(doc):
        path = "/".join(map(str, where))
        if where and where[-1] in ("runAsUser", "fsGroup", "initContainers"):
            found.append(f"{path}: {where[-1]}")
        if kubernetes and isinstance(node, str) and INSTALLS.search(node):
            found.append(f"{path}: installs packages: {INSTALLS.search(node).group(0)!r}")
    return found


def test_no_manifest_fixes_a_uid_or_installs_packages_at_pod_start():
    """Issue 20: no runAsUser or fsGroup anywhere (restricted-v2 assigns the uid), no init container, no package
    installed by a Kubernetes manifest (docker-compose.yml's one-shot export job installs the exporter's
    packages into its own container, which serves nothing)."""
    manifests = shipped_manifests()
    assert {DEPLOY / name for name in [*RUNTIMES, *ISVCS, "template.yaml"]} <= set(manifests)
    found = []
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            found += [f"{path.relative_to(ROOT)}: {p}" for p in pod_start_problems(doc, path.suffix == ".yaml")]
    assert found == []
    # The check sees what it looks for.
    runtime = load("servingruntime-cpu.yaml")
    kserve_container(runtime)["securityContext"]["runAsUser"] = 1000
    init = {"name": "deps", "image": "x", "command": ["sh", "-c", "python3 -m pip install onnxruntime"]}
    isvc = load("inferenceservice-cpu.yaml")
    isvc["spec"]["predictor"]["initContainers"] = [init]
    assert len(pod_start_problems(runtime)) == 1 and len(pod_start_problems(isvc)) == 2


def test_scaled_object_scales_the_predictor_on_triton_queue_time():
    scaled = load("scaledobject.yaml")
    isvc = load("inferenceservice-s3.yaml")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": isvc["metadata"]["name"] + "-predictor",
    }
    predictor = isvc["spec"]["predictor"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (predictor["minReplicas"], predictor["maxReplicas"])
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external", (
        "a ScaledObject of our own needs KServe to stay out (keda would make KServe create its own)"
    )

    queue = [t for t in spec["triggers"] if "nv_inference_queue_duration_us" in t["metadata"].get("query", "")]
    assert len(queue) == 1
    trigger = queue[0]
    query = trigger["metadata"]["query"]
    assert trigger["type"] == "prometheus"
    assert "nv_inference_request_success" in query
    assert query.count("(") == query.count(")")
    assert re.search(r"nv_inference_queue_duration_us\{[^}]*\}\[1m\].*/.*nv_inference_request_success", query, re.S)
    for selector in re.findall(r"\{([^}]*)\}", query):
        assert 'model="safety_checker_embedder"' in selector
        assert f'namespace="{scaled["metadata"]["namespace"]}"' in selector
        assert f'pod=~"{spec["scaleTargetRef"]["name"]}-.*"' in selector
    threshold = float(trigger["metadata"]["threshold"])  # microseconds
    assert 1_000 <= threshold <= 10_000_000
    assert trigger["metricType"] == "Value", "an average latency scales by ratio, not per replica"


def test_concept_configmap_is_an_empty_valid_concept_set():
    try:
        from safety_checker_served import concept_set
    except ImportError:  # before the admin package lands
        from safety_checker_client import concept_set
    configmap = load("concepts-configmap.yaml")
    text = configmap["data"][concept_set.FILENAME]
    parsed = concept_set.parse(text, embedding_dim=768)
    assert (parsed.version, parsed.embedding_dim, parsed.concepts) == (0, 768, ())
    assert json.loads(text)["format_version"] == concept_set.FORMAT_VERSION


# -- the gateway as the InferenceService's transformer (issue 19) --------------------------------------------
def transformer_container() -> Dict[str, Any]:
    containers = load("inferenceservice-s3.yaml")["spec"]["transformer"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"], "one container, named as KServe expects"
    return containers[0]


def test_the_seed_services_url_goes_through_the_gateway_transformer():
    """KServe routes an InferenceService's URL to its transformer: the one named safety-checker, the name the seed
    runtime's callers use, puts the gateway there, talking gRPC to the predictor's runtime."""
    isvc = load("inferenceservice-s3.yaml")
    assert isvc["metadata"]["name"] == "safety-checker"
    container = transformer_container()
    script = container["command"][2]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert re.search(r'^exec "safety-checker" "gateway" .*"\$@"$', script, re.M), script
    for appended in ("--predictor_host", "--model_name", "--http_port"):
        assert f"    {appended}) take=" in script, f"KServe's {appended} is not taken"
    env = {e["name"]: e.get("value") for e in container["env"]}
    runtime = kserve_container(load("servingruntime-gpu.yaml"))
    assert env["TRITON_GRPC_PORT"] == one(flags(runtime["args"]), "grpc-port")
    assert {p["containerPort"]: p["name"] for p in runtime["ports"]}[int(env["TRITON_GRPC_PORT"])] == "h2c"
    (port,) = container["ports"]
    assert (port["containerPort"], port.get("protocol", "TCP")) == (render.GATEWAY_PORT, "TCP")
    assert '"--port=8080"' in script
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/v2/health/ready", render.GATEWAY_PORT)
    assert (live["path"], live["port"]) == ("/v2/health/live", render.GATEWAY_PORT)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and "runAsUser" not in security  # any uid: OpenShift assigns one
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]
    assert container["image"] == re.fullmatch(r"\$\{GATEWAY_IMAGE:-([^}]+)\}", compose["image"]).group(1)


def test_the_transformers_key_comes_from_an_optional_secret_no_manifest_holds():
    transformer = load("inferenceservice-s3.yaml")["spec"]["transformer"]
    container = transformer_container()
    key_file = next(e["value"] for e in container["env"] if e["name"] == "GATEWAY_API_KEY_FILE")
    (mount,) = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in transformer["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["optional"] is True, "without the Secret the gateway asks no key"
    assert key_file == f"{mount['mountPath']}/key"
    assert volume["secret"]["secretName"] not in {load(p.name)["metadata"]["name"] for p in manifest_files()}
    guide = (ROOT / "docs" / "deploy-kserve.md").read_text()
    assert f"kubectl create secret generic {volume['secret']['secretName']}" in guide


# Issue 18, finding 4: the guides make the admin key's Secret at install, with a random key; nothing ships one.
KEY_DOCS = [ROOT / "README.md", ROOT / "docs" / "deploy-kserve.md", DEPLOY / "README.md"]
CREATE_SECRET = re.compile(
    r"kubectl create secret generic (?P<name>[-a-z0-9]+)(?: -n \S+)? \\?\s*"
    r'--from-literal=(?P<key>\w+)="\$\(openssl rand -hex 32\)"'
)


def created_secret() -> Tuple[str, str]:
    """The Secret's name and key as every guide creates it (one command, the same in each)."""
    made = {(m["name"], m["key"]) for doc in KEY_DOCS for m in CREATE_SECRET.finditer(doc.read_text())}
    assert len(made) == 1, f"the guides create the admin key's Secret as {made}"
    return made.pop()


def test_finding_4_the_guides_generate_the_admin_key_at_install():
    for doc in KEY_DOCS:
        text = doc.read_text()
        assert CREATE_SECRET.search(text), f"{doc.name} does not create the Secret with `openssl rand -hex 32`"
        assert "admin-api-secret.yaml" not in text, f"{doc.name} still applies the placeholder Secret"
    assert created_secret() == ("safety-checker-admin-api", "key")


def shipped_text_files() -> List[Path]:
    """What an operator reads or applies: the deploy folder, the docs, the README and the compose file."""
    files = [ROOT / "README.md", ROOT / "docker-compose.yml", *sorted((ROOT / "docs").rglob("*.md"))]
    files += sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix in (".md", ".yaml", ".yml"))
    return files


def test_finding_4_no_manifest_or_doc_ships_a_placeholder_key():
    """No manifest is a Secret (a key in a manifest is a key in the repository), and a placeholder key shows up
    only where the start-up check refuses it: as a `case` pattern of the rendered shell lines."""
    from safety_checker_admin.admin_key import PLACEHOLDER_KEYS

    assert not (DEPLOY / "admin-api-secret.yaml").exists()
    assert all(load(p.name)["kind"] != "Secret" for p in manifest_files())
    for path in shipped_text_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for placeholder in PLACEHOLDER_KEYS:
                for found in re.finditer(re.escape(placeholder), line):
                    refused = re.match(r"\) problem=", line[found.end() :])
                    assert refused, f"{path.relative_to(ROOT)}:{number} holds the placeholder key {placeholder}"
    assert any("REPLACE-ME" in line for line in (DEPLOY / "servingruntime-gpu.yaml").read_text().splitlines())


def test_readme_has_a_paragraph_for_every_manifest():
    readme = (DEPLOY / "README.md").read_text()
    for path in manifest_files():
        assert f"`{path.name}`" in readme, path.name


# -- the validator catches what it must ------------------------------------------------
def _broken(name: str, change) -> List[str]:
    doc = copy.deepcopy(load(name))
    change(doc)
    return problems(doc)


@pytest.mark.parametrize(
    "name, change, expected",
    [
        (
            "inferenceservice-s3.yaml",
            lambda d: d["spec"]["predictor"].__setitem__("minReplicas", "1"),
            "spec/predictor/minReplicas: '1' is not of type 'integer'",
        ),
        (
            "inferenceservice-s3.yaml",
            lambda d: d["spec"]["predictor"].__setitem__("maxReplicas", 2**31),
            "is not a 'int32'",
        ),
        (
            "inferenceservice-s3.yaml",
            lambda d: d["spec"]["predictor"]["model"].__setitem__(
                "storageURI", d["spec"]["predictor"]["model"]["storageUri"]
            ),
            "unknown field 'storageURI'",
        ),
        ("inferenceservice-pvc.yaml", lambda d: d["spec"].pop("predictor"), "'predictor' is a required property"),
        (
            "inferenceservice-s3.yaml",
            lambda d: d["spec"]["predictor"]["model"]["resources"]["limits"].__setitem__("memory", "16 GB"),
            "does not match",
        ),
        (
            "inferenceservice-s3.yaml",
            lambda d: d["spec"]["predictor"]["model"]["resources"]["limits"].__setitem__("cpu", 1.5),
            "1.5 is neither an integer nor a string",
        ),
        (
            "servingruntime-gpu.yaml",
            lambda d: d["spec"]["containers"][0]["ports"][0].__setitem__("containerPort", "8000"),
            "'8000' is not of type 'integer'",
        ),
        (
            "servingruntime-gpu.yaml",
            lambda d: d["spec"]["containers"][0]["ports"].append({"containerPort": 8000}),
            "in a list of type map",
        ),
        ("servingruntime-cpu.yaml", lambda d: d["spec"].pop("containers"), "'containers' is a required property"),
        (
            "servingruntime-gpu.yaml",
            lambda d: d["spec"]["annotations"].__setitem__("prometheus.io/port", 8002),
            "8002 is not of type 'string'",
        ),
        ("servingruntime-gpu.yaml", lambda d: d["metadata"].__setitem__("name", "Safety_Checker"), "does not match"),
        (
            "template.yaml",
            lambda d: d["objects"][0]["spec"]["containers"][0].__setitem__("imagePullPolicy", 3),
            "objects/0: ServingRuntime spec/containers/0/imagePullPolicy",
        ),
        (
            "scaledobject.yaml",
            lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("threshold", 50000),
            "50000 is not of type 'string'",
        ),
        (
            "scaledobject.yaml",
            lambda d: d["spec"]["triggers"][0].__setitem__("metricType", "Average"),
            "'Average' is not one of",
        ),
        ("scaledobject.yaml", lambda d: d["spec"].pop("scaleTargetRef"), "'scaleTargetRef' is a required property"),
        ("concepts-configmap.yaml", lambda d: d["data"].__setitem__("custom concepts.json", "{}"), "does not match"),
        ("concepts-configmap.yaml", lambda d: d.__setitem__("datta", {"key": "x"}), "unknown field 'datta'"),
        ("concepts-configmap.yaml", lambda d: d.__setitem__("apiVersion", "v2"), "no schema for apiVersion 'v2'"),
    ],
)
def test_validation_fails_on_a_broken_copy(name, change, expected):
    assert not problems(load(name)), "the original must be valid for this test to mean anything"
    found = _broken(name, change)
    assert any(expected in line for line in found), f"expected {expected!r} in:\n  " + "\n  ".join(found)


def test_nullable_is_honoured():
    validator = KubernetesValidator(
        {"type": "object", "properties": {"a": {"type": "string", "nullable": True}, "b": {"type": "string"}}}
    )
    assert not list(validator.iter_errors({"a": None}))
    assert list(validator.iter_errors({"b": None}))
