"""OpenShift AI: the manifests of deploy/kserve/openshift/, the autoscaling chain, and docs/deploy-openshift-ai.md.

Every resource is validated offline and strictly (unknown fields are errors)
with test_deploy_manifests' validator, against the schemas its publishers
ship (vendored in deploy/kserve/schemas/, provenance in its README). The
content tests check what a cluster would only show by not working: that the
ScaledObject, the TriggerAuthentication, the token Secret, the Role and the
PodMonitor refer to each other and to the runtimes' metrics port; that the
data connection has the dashboard's format; that no file holds a credential;
and that the admin key's generator only makes keys the runtimes accept. The
walkthrough's commands are read from the page and checked or run: each file
it applies validates, each template parameter it passes exists, its
`concepts export` line writes the ConfigMap the runtimes mount, and its
request body is answered by a real tritonserver (marked server).
"""

from __future__ import annotations

import copy
import json
import random
import re
import shlex
import string
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml
from image_files import photo_files
from test_deploy_manifests import (
    DEPLOY,
    ROOT,
    SCHEMA_FILES,
    SCHEMAS,
    created_secret,
    flags,
    kserve_container,
    load,
    one,
    schema,
)
from test_deploy_manifests import problems as manifest_problems

from safety_checker_admin.admin_key import key_problem

OPENSHIFT = DEPLOY / "openshift"
WALKTHROUGH = ROOT / "docs" / "deploy-openshift-ai.md"
THANOS = "https://thanos-querier.openshift-monitoring.svc.cluster.local:9092"

# The kinds of deploy/kserve/openshift/ (and what their Templates hold), beside test_deploy_manifests' own.
KINDS = {
    **SCHEMA_FILES,
    ("v1", "Secret"): "secret.v1.json",
    ("v1", "ServiceAccount"): "serviceaccount.v1.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "role.rbac.v1.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding.rbac.v1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.v1.json",
    ("dashboard.opendatahub.io/v1", "AcceleratorProfile"): "acceleratorprofile.v1.json",
    ("image.openshift.io/v1", "ImageStream"): "imagestream.image.v1.json",
    ("build.openshift.io/v1", "BuildConfig"): "buildconfig.build.v1.json",
}

# The trigger metadata KEDA's prometheus scaler reads (pkg/scalers/prometheus_scaler.go and
# authentication.Config at the vendored commit); any other key is ignored without a word.
PROMETHEUS_METADATA = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "awsRegion",
    "timeout",
    "identityOwner",
    "authModes",
}
DATA_CONNECTION_KEYS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_S3_ENDPOINT",
    "AWS_DEFAULT_REGION",
    "AWS_S3_BUCKET",
}
CREDENTIAL = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)


# -- reading and validating -----------------------------------------------------------------------------------------
def problems(doc: Dict[str, Any]) -> List[str]:
    """Every schema violation of one resource and of the resources a Template holds (test_deploy_manifests' rules)."""
    return manifest_problems(doc, KINDS)


def documents(path: Path) -> List[Dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def openshift_files() -> List[Path]:
    return sorted(OPENSHIFT.glob("*.yaml"))


def find(kind: str, name: str = "") -> Dict[str, Any]:
    """The one resource of `kind` (named `name`, when given) in deploy/kserve/openshift/."""
    found = [
        d
        for p in openshift_files()
        for d in documents(p)
        if d["kind"] == kind and d["metadata"]["name"] == (name or d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def every_resource() -> Iterator[Tuple[Path, Dict[str, Any]]]:
    """Every resource of every YAML file under deploy/, and every object its Templates hold."""
    for path in sorted((ROOT / "deploy").rglob("*.y*ml")):
        for doc in documents(path):
            yield path, doc
            for inner in doc.get("objects", []) if doc.get("kind") == "Template" else []:
                yield path, inner


def parameters(template: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {p["name"]: p for p in template.get("parameters", [])}


# -- every file validates, strictly ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", openshift_files(), ids=lambda p: p.name)
def test_openshift_manifest_validates_against_its_schema(path):
    docs = documents(path)
    assert docs, path.name
    found = [line for doc in docs for line in problems(doc)]
    assert not found, f"{path.name}:\n  " + "\n  ".join(found)


def _broken(kind: str, change) -> List[str]:
    doc = copy.deepcopy(find(*kind.split("/")))
    assert not problems(doc), "the original must be valid for this test to mean anything"
    change(doc)
    return problems(doc)


@pytest.mark.parametrize(
    "kind, change, expected",
    [
        (
            "TriggerAuthentication",
            lambda d: d["spec"].__setitem__("secretTargetRefs", []),
            "unknown field 'secretTargetRefs'",
        ),
        ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].pop("key"), "'key' is a required property"),
        ("PodMonitor", lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
        ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0].__setitem__("interval", "15"), "does not match"),
        ("PodMonitor", lambda d: d["spec"].__setitem__("endpoints", []), "unknown field 'endpoints'"),
        ("Secret", lambda d: d.__setitem__("stringdata", {}), "unknown field 'stringdata'"),
        (
            "ServiceAccount/safety-checker",
            lambda d: d.__setitem__("automountServiceAccountToken", "no"),
            "is not of type 'boolean'",
        ),
        ("Role", lambda d: d["rules"][0].__setitem__("verbs", "get"), "is not of type 'array'"),
        ("RoleBinding", lambda d: d.pop("roleRef"), "'roleRef' is a required property"),
        ("AcceleratorProfile", lambda d: d["spec"].pop("identifier"), "'identifier' is a required property"),
        ("ImageStream", lambda d: d["spec"]["lookupPolicy"].__setitem__("local", "true"), "is not of type 'boolean'"),
        ("BuildConfig", lambda d: d["spec"]["strategy"].__setitem__("dockerstrategy", {}), "unknown field"),
        ("Template", lambda d: d["parameters"][0].__setitem__("generator", "expression"), "unknown field 'generator'"),
        ("Template", lambda d: d["objects"][0].__setitem__("strngData", {}), "objects/0: Secret (top): unknown field"),
    ],
)
def test_validation_fails_on_a_broken_copy(kind, change, expected):
    if kind == "Template":
        doc = copy.deepcopy(documents(OPENSHIFT / "admin-key-template.yaml")[0])
        change(doc)
        found = problems(doc)
    else:
        found = _broken(kind, change)
    assert any(expected in line for line in found), f"expected {expected!r} in:\n  " + "\n  ".join(found)


def test_schemas_are_vendored_with_their_provenance():
    readme = (SCHEMAS / "README.md").read_text()
    used = set(KINDS.values()) | {"objectmeta.json", "scaledobject.rules.json"}
    on_disk = {p.name for p in SCHEMAS.glob("*.json")}
    assert on_disk == used, f"unused {on_disk - used}, missing {used - on_disk}"
    for name in on_disk:
        assert f"`{name}`" in readme, f"{name} has no line in schemas/README.md"
    for commit in (
        "8b4f083ca8c8c2baf8477e322bd4d16ac4dfa09a",  # KEDA
        "6adcebc5076c34f4f55f8f5f7b1e528929373ac7",  # Prometheus operator
        "2a3d73913b5a7caec4c57d5c3d04f51106ec4da3",  # openshift/api
        "6eb8ae01e9139505d0683d86d94b4fd27378ed59",  # odh-dashboard
    ):
        assert commit in readme, commit
    assert len(re.findall(r"^[0-9a-f]{64}  \S+$", readme, re.M)) >= 8, "SHA-256 of every vendored source file"
    # The ScaledObject schema is KEDA's CRD, whole, and the hand-written rules beside it, nothing else.
    scaled = schema("scaledobject.v1alpha1.json")
    assert list(scaled) == ["allOf"] and scaled["allOf"][1] == schema("scaledobject.rules.json")
    assert scaled["allOf"][0]["properties"]["spec"]["required"] == ["scaleTargetRef", "triggers"]
    template = schema("template.v1.json")
    assert (
        template["required"] == ["objects"]
        and "com.github.openshift.api.template.v1.Parameter" in template["definitions"]
    )


# -- autoscaling on OpenShift ---------------------------------------------------------------------------------------
def test_the_scaled_object_queries_thanos_with_the_trigger_authentication():
    scaled = load("scaledobject.yaml")
    auth = find("TriggerAuthentication")
    triggers = scaled["spec"]["triggers"]
    assert triggers
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert trigger["type"] == "prometheus"
        assert set(metadata) <= PROMETHEUS_METADATA, f"keys KEDA ignores: {set(metadata) - PROMETHEUS_METADATA}"
        assert metadata["serverAddress"] == THANOS
        assert metadata["namespace"] == scaled["metadata"]["namespace"], "the tenancy port answers for this namespace"
        assert metadata["authModes"] == "bearer"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert trigger["authenticationRef"].get("kind", "TriggerAuthentication") == "TriggerAuthentication"
        assert "unsafeSsl" not in metadata, "the querier's certificate is verified with the service CA"

    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"bearerToken", "ca"}
    token = find("Secret", refs["bearerToken"]["name"])
    assert refs["ca"]["name"] == token["metadata"]["name"]
    # The keys the token controller writes into a kubernetes.io/service-account-token Secret.
    assert (refs["bearerToken"]["key"], refs["ca"]["key"]) == ("token", "ca.crt")
    assert token["type"] == "kubernetes.io/service-account-token"
    assert not token.get("data") and not token.get("stringData"), "the cluster fills it"
    account = find("ServiceAccount", token["metadata"]["annotations"]["kubernetes.io/service-account.name"])

    binding = find("RoleBinding")
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in binding["subjects"]
    role = find(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    assert role["kind"] == "Role", "a namespaced grant, not a cluster-wide one"
    grants = {
        (group, resource, verb)
        for r in role["rules"]
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }
    assert ("metrics.k8s.io", "pods", "get") in grants, "what the querier's tenancy port checks"
    assert all(verb in {"get", "list", "watch"} for _, _, verb in grants), "read only"


def test_the_pod_monitor_scrapes_the_runtimes_metrics_port_on_the_predictor_pods():
    monitor = find("PodMonitor")
    isvc = load("inferenceservice-s3.yaml")
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for name in ("servingruntime-gpu.yaml", "servingruntime-cpu.yaml"):
        container = kserve_container(load(name))
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert ports[endpoint["port"]] == int(one(flags(container["args"]), "metrics-port")), name
    # The scraped series carry the pod's name, which the queries select on.
    scaled = load("scaledobject.yaml")
    for trigger in scaled["spec"]["triggers"]:
        assert f'pod=~"{isvc["metadata"]["name"]}-predictor-.*"' in trigger["metadata"]["query"]


# -- the dashboard's data connection, the storage, the accelerator --------------------------------------------------
def test_the_data_connection_has_the_dashboards_format_and_the_inference_service_uses_it():
    template = documents(OPENSHIFT / "data-connection-template.yaml")[0]
    (secret,) = template["objects"]
    meta = secret["metadata"]
    assert meta["name"].startswith("aws-connection-"), "the dashboard's name for a data connection"
    assert meta["labels"]["opendatahub.io/dashboard"] == "true" and meta["labels"]["opendatahub.io/managed"] == "true"
    assert meta["annotations"]["opendatahub.io/connection-type"] == "s3"
    assert meta["annotations"]["openshift.io/display-name"] == meta["name"].removeprefix("aws-connection-")
    assert set(secret["stringData"]) == DATA_CONNECTION_KEYS
    params = parameters(template)
    for key, value in secret["stringData"].items():
        assert value == "${" + key + "}", f"{key} comes from the parameter of its name"
        assert params[key]["required"] is True
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_S3_ENDPOINT"):
        assert "value" not in params[key] and "generate" not in params[key], f"{key}: the user gives it"

    model = load("inferenceservice-s3.yaml")["spec"]["predictor"]["model"]
    assert model["storage"]["key"] == meta["name"]
    bucket = re.fullmatch(r"s3://([^/]+)/.+", model["storageUri"]).group(1)
    assert bucket == params["AWS_S3_BUCKET"]["value"]
    # The predictor's service account is one the walkthrough creates.
    account = load("inferenceservice-s3.yaml")["spec"]["predictor"]["serviceAccountName"]
    assert find("ServiceAccount", account)


def test_the_accelerator_profile_is_the_one_the_gpu_runtime_recommends():
    profile = find("AcceleratorProfile")
    runtime = load("servingruntime-gpu.yaml")
    annotations = runtime["metadata"]["annotations"]
    assert profile["metadata"]["name"] == annotations["opendatahub.io/accelerator-name"]
    assert [profile["spec"]["identifier"]] == json.loads(annotations["opendatahub.io/recommended-accelerators"])
    assert profile["spec"]["enabled"] is True
    assert profile["spec"]["tolerations"] == runtime["spec"]["tolerations"]
    requests = kserve_container(runtime)["resources"]["requests"]
    assert profile["spec"]["identifier"] in requests


def test_the_gateway_build_makes_the_image_the_transformer_names():
    stream, build = find("ImageStream"), find("BuildConfig")
    assert stream["spec"]["lookupPolicy"]["local"] is True, "pods of the project name it without the registry"
    output = build["spec"]["output"]["to"]
    assert output["kind"] == "ImageStreamTag" and output["name"].split(":")[0] == stream["metadata"]["name"]
    transformer = load("inferenceservice-s3.yaml")["spec"]["transformer"]["containers"][0]
    assert transformer["image"] == output["name"]
    dockerfile = ROOT / build["spec"]["strategy"]["dockerStrategy"]["dockerfilePath"]
    assert build["spec"]["source"]["type"] == "Binary"
    # The walkthrough's archive holds every path the Dockerfile copies.
    (tar,) = [c for c in commands() if c[:2] == ["tar", "-czf"]]
    sources = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
    assert sources and all(any(s == t or s.startswith(t + "/") for t in tar[3:]) for s in sources), (sources, tar)
    assert any(c[:2] == ["oc", "start-build"] and f"--from-archive={tar[2]}" in c for c in commands())


# -- the admin key, and no credential anywhere ----------------------------------------------------------------------
def expand(expression: str, rng: random.Random) -> str:
    """One value of an OpenShift template `generate: expression` (its generator's grammar: `[ranges]{n}` and
    literal characters; anything else fails here, as it would produce something other than intended)."""
    out, position = [], 0
    for match in re.finditer(r"\[([^\]]+)\]\{(\d+)\}", expression):
        assert not expression[position : match.start()].strip("abcdefghijklmnopqrstuvwxyz0123456789-_"), expression
        out.append(expression[position : match.start()])
        members = re.findall(r"(.)-(.)|(.)", match.group(1))
        alphabet = "".join(
            "".join(chr(c) for c in range(ord(a), ord(b) + 1)) if a else single for a, b, single in members
        )
        out.append("".join(rng.choice(alphabet) for _ in range(int(match.group(2)))))
        position = match.end()
    return "".join(out) + expression[position:]


def test_the_admin_key_is_generated_at_install_into_the_secret_the_runtimes_read():
    template = documents(OPENSHIFT / "admin-key-template.yaml")[0]
    (secret,) = template["objects"]
    name, key = created_secret()  # what the guides create and the runtimes' secretKeyRef reads
    assert (secret["metadata"]["name"], list(secret["stringData"])) == (name, [key])
    reference = re.fullmatch(r"\$\{(\w+)\}", secret["stringData"][key]).group(1)
    parameter = parameters(template)[reference]
    assert parameter["generate"] == "expression" and "value" not in parameter
    # The expression's alphabet and length are inside the runtimes' rule: every key it makes passes.
    assert parameter["from"] == "[a-zA-Z0-9]{64}"
    alphabet = string.ascii_letters + string.digits
    assert key_problem(alphabet * 2) is None and key_problem(alphabet[:63]) is None
    rng = random.Random(20)
    keys = [expand(parameter["from"], rng) for _ in range(200)]
    assert all(len(k) == 64 and set(k) <= set(alphabet) for k in keys)
    assert all(key_problem(k) is None for k in keys)
    assert len(set(keys)) == len(keys)
    assert expand("[a-c]{3}x", random.Random(0))[-1] == "x" and key_problem(expand("[a-z]{8}", rng)) is not None


def test_no_file_under_deploy_holds_a_credential():
    """A Secret's values are `${PARAMETER}`s of its Template that the user gives or OpenShift generates, or empty
    (a token Secret the cluster fills); a credential parameter has no default."""
    secrets = 0
    for path, doc in every_resource():
        if doc.get("kind") != "Secret":
            continue
        secrets += 1
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        template = documents(path)[0]
        params = parameters(template) if template.get("kind") == "Template" else {}
        for key, value in values.items():
            reference = re.fullmatch(r"\$\{(\w+)\}", str(value))
            assert reference and reference.group(1) in params, f"{path.name}: {key} holds a literal value"
            parameter = params[reference.group(1)]
            if CREDENTIAL.search(key):
                assert "value" not in parameter, f"{path.name}: {key} has a default"
    assert secrets == 3, "the token Secret, the admin key's and the data connection's"


# -- the walkthrough ------------------------------------------------------------------------------------------------
def commands() -> List[List[str]]:
    """The shell commands of the walkthrough's bash blocks, continuation lines joined, pipelines split."""
    blocks = re.findall(r"```bash\n(.*?)```", WALKTHROUGH.read_text(), re.S)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).rstrip(" &")
            for part in line.split(" | "):
                if part.strip():
                    found.append(shlex.split(part, posix=True))
    return found


def file_arguments(command: List[str]) -> List[Path]:
    return [ROOT / command[i + 1] for i, word in enumerate(command[:-1]) if word == "-f" and command[i + 1] != "-"]


def test_every_file_the_walkthrough_applies_exists_and_validates():
    applied = [
        c for c in commands() if c[:2] in (["oc", "apply"], ["oc", "process"], ["oc", "create"], ["kubectl", "apply"])
    ]
    files = [path for c in applied for path in file_arguments(c)]
    assert len(files) >= 12
    for path in files:
        assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
        found = [line for doc in documents(path) for line in problems(doc)]
        assert not found, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(found)
    named = {p.relative_to(ROOT).as_posix() for p in files}
    for needed in ("deploy/kserve/scaledobject.yaml", "deploy/kserve/openshift/monitoring.yaml"):
        assert needed in named, needed
    assert {p.relative_to(ROOT).as_posix() for p in openshift_files()} <= named, "a manifest the walkthrough never uses"


def test_every_inference_service_the_walkthrough_applies_has_what_the_walkthrough_creates():
    """Each InferenceService reads S3 through the data connection of step 3 and runs under a service account
    that a file the walkthrough applies creates: a cluster would otherwise refuse its pods or their download."""
    files = [path for c in commands() for path in file_arguments(c)]
    created = {(d["kind"], d["metadata"]["name"]) for path in files for d in documents(path)}
    connection = documents(OPENSHIFT / "data-connection-template.yaml")[0]["objects"][0]["metadata"]["name"]
    services = [d for path in files for d in documents(path) if d["kind"] == "InferenceService"]
    assert {d["metadata"]["name"] for d in services} >= {"safety-checker", "safety-checker-cpu"}
    for isvc in services:
        predictor = isvc["spec"]["predictor"]
        name = isvc["metadata"]["name"]
        if predictor["model"]["storageUri"].startswith("s3://"):
            assert predictor["model"].get("storage", {}).get("key") == connection, f"{name}: not the data connection"
        if "serviceAccountName" in predictor:
            assert ("ServiceAccount", predictor["serviceAccountName"]) in created, f"{name}: no such service account"


def test_the_walkthrough_processes_templates_with_their_own_parameters():
    processed = [c for c in commands() if c[:2] == ["oc", "process"]]
    assert len(processed) == 2
    for command in processed:
        (path,) = file_arguments(command)
        params = parameters(documents(path)[0])
        given = {command[i + 1].split("=", 1)[0] for i, word in enumerate(command[:-1]) if word == "-p"}
        assert given <= set(params), f"{path.name}: unknown parameters {given - set(params)}"
        needed = {n for n, p in params.items() if p.get("required") and "value" not in p and "generate" not in p}
        assert needed <= given, f"{path.name}: the walkthrough leaves {needed - given} out"


def test_the_walkthrough_orders_what_a_replica_needs_before_the_inference_service():
    order = [p.name for c in commands() for p in file_arguments(c)]
    for isvc in ("inferenceservice-s3.yaml", "inferenceservice-cpu.yaml"):
        at = order.index(isvc)
        for needed in (
            "admin-key-template.yaml",
            "data-connection-template.yaml",
            "concepts-configmap.yaml",
            "serviceaccount.yaml",
        ):
            assert needed in order[:at], f"{needed} comes after {isvc}"
    assert order.index("monitoring.yaml") < order.index("scaledobject.yaml")


def test_the_walkthroughs_concept_export_writes_the_configmap_the_runtimes_mount(tmp_path):
    (export,) = [c for c in commands() if c[1:4] == ["concepts", "export", "--concepts-dir"]]
    assert export[0] == ".venv/bin/safety-checker"
    folder = tmp_path / "concepts"
    folder.mkdir()
    configmap = load("concepts-configmap.yaml")
    (folder / "custom_concepts.json").write_text(configmap["data"]["custom_concepts.json"])
    argv = [str(folder) if a == "concepts" and export[i - 1] == "--concepts-dir" else a for i, a in enumerate(export)]
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from safety_checker_client.cli import main; sys.exit(main())", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(result.stdout)
    assert not problems(written)
    volumes = {v["name"]: v for v in load("servingruntime-gpu.yaml")["spec"]["volumes"]}
    assert written["metadata"]["name"] == volumes["concepts"]["configMap"]["name"]
    assert written["metadata"]["namespace"] == load("scaledobject.yaml")["metadata"]["namespace"]
    assert written["data"] == configmap["data"]


def request_lines(guide: Path) -> Tuple[str, List[str]]:
    """A guide's printf line that writes request.json, as one shell line, and the curl command that sends it."""
    text = guide.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith('printf \'{"inputs"') and "request.json" in line]
    curls = [shlex.split(c) for c in re.findall(r"^curl .*$", text, re.M) if "-d @request.json" in c]
    assert len(curls) == 1, curls
    return line, curls[0]


def test_the_gateway_body_of_the_walkthrough_is_the_kserve_runtimes():
    (curl,) = [c for c in commands() if c[:1] == ["curl"] and "localhost:8080/v2/models/safety-checker/infer" in c]
    body = curl[curl.index("-d") + 1].replace("$(base64 -w0 photo.png)", "AAAA")
    (tensor,) = json.loads(body)["inputs"]
    assert (tensor["name"], tensor["shape"], tensor["datatype"]) == ("image", [1, 1], "String")


@pytest.mark.server
@pytest.mark.parametrize("guide", [WALKTHROUGH, ROOT / "docs" / "deploy-kserve.md"], ids=lambda p: p.name)
def test_the_guides_request_is_answered_by_tritonserver(server, tmp_path, guide):
    """The first request as written: the printf line builds request.json from a photo, and its curl target answers."""
    photo = next(data for name, data in sorted(photo_files().items()) if name.endswith(".png"))
    (tmp_path / "photo.png").write_bytes(photo)
    line, curl = request_lines(guide)
    subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True, timeout=60)
    route = next(a for a in curl if a.startswith("localhost:8000/")).removeprefix("localhost:8000")
    request = urllib.request.Request(
        f"http://{server.http_url}{route}",
        data=(tmp_path / "request.json").read_bytes(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)
    assert answer["model_name"] == "safety_checker_images"
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("has_nsfw_concepts", "BOOL", [1, 1])
    assert output["data"] in ([False], [True])
