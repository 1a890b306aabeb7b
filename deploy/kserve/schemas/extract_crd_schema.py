"""Write the JSON schema of one API kind, unchanged, from its publisher's machine-readable definition.

How the vendored schemas in this folder were made (see README.md); run it
again to refresh them from a newer source:

    python deploy/kserve/schemas/extract_crd_schema.py CRD.yaml VERSION OUT.json [--and RULES.json]
    python deploy/kserve/schemas/extract_crd_schema.py --openapi OPENAPI.json DEFINITION OUT.json

The first form takes one version's openAPIV3Schema of a
CustomResourceDefinition; `--and` wraps it as {"allOf": [schema, rules]} with
a hand-written file of the rules the cluster applies beyond the CRD (its
admission webhooks, the objects the operator creates), so that the CRD part
stays byte-for-byte the publisher's. The second form takes a definition of
an OpenAPI v2 document (OpenShift's openapi.json: the Template kind and the
core Kubernetes kinds) with every definition it references, under
"definitions", so that its "#/definitions/..." references resolve in the
written file. Only YAML becomes JSON; the tests read the JSON files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml


def extract(crd_path: Path, version: str) -> dict:
    crd = yaml.safe_load(crd_path.read_text())
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"{crd_path}: not a CustomResourceDefinition (kind {crd.get('kind')!r})")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    names = ", ".join(entry["name"] for entry in crd["spec"]["versions"])
    raise SystemExit(f"{crd_path}: no version {version!r} (it has {names})")


def _references(node: Any) -> List[str]:
    """The definition names `node` refers to with "#/definitions/NAME"."""
    if isinstance(node, dict):
        found = [node["$ref"].split("/", 2)[2]] if isinstance(node.get("$ref"), str) else []
        return found + [name for value in node.values() for name in _references(value)]
    if isinstance(node, list):
        return [name for value in node for name in _references(value)]
    return []


def extract_definition(openapi_path: Path, name: str) -> dict:
    definitions: Dict[str, Any] = json.loads(openapi_path.read_text())["definitions"]
    if name not in definitions:
        raise SystemExit(f"{openapi_path}: no definition {name!r}")
    needed, pending = {}, _references(definitions[name])
    while pending:
        wanted = pending.pop()
        if wanted not in needed:
            needed[wanted] = definitions[wanted]
            pending += _references(definitions[wanted])
    return {**definitions[name], "definitions": dict(sorted(needed.items()))}


def main(argv: List[str]) -> int:
    if len(argv) == 5 and argv[1] == "--openapi":
        schema = extract_definition(Path(argv[2]), argv[3])
        out = argv[4]
    elif len(argv) in (4, 6) and (len(argv) == 4 or argv[4] == "--and"):
        schema = extract(Path(argv[1]), argv[2])
        if len(argv) == 6:
            schema = {"allOf": [schema, json.loads(Path(argv[5]).read_text())]}
        out = argv[3]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    Path(out).write_text(json.dumps(schema, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
