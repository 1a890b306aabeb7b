"""Write one version's openAPIV3Schema of a CustomResourceDefinition as JSON.

How the CRD schemas in this folder were made (see README.md); run it again
to refresh them from a newer CRD:

    python deploy/kserve/schemas/extract_crd_schema.py CRD.yaml VERSION OUT.json

The schema is written unchanged (same keys, same order); only the YAML
becomes JSON. The tests read the JSON files, never the CRD.
"""

import json
import sys
from pathlib import Path

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


def main(argv) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    schema = extract(Path(argv[1]), argv[2])
    Path(argv[3]).write_text(json.dumps(schema, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
