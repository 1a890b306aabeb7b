"""`safety-checker concepts ...`: manage the custom concept set of a served model repository.

Every change is validated with the same module the server reads the file
with, written atomically (temporary file + os.replace, under a lock so two
commands cannot lose each other's change), and then confirmed: the command
sends small requests until the running server answers with the new set's
version, or fails with a clear error after --wait-timeout seconds.

A file that does not validate (edited by hand into invalid JSON, say) is
never modified: the command names the problem and where it is, and the
server keeps serving the last valid set meanwhile. `restore FILE` rolls back:
it publishes an older file's concepts as the next version (a server takes
only newer versions), and also mends a file that does not validate.

Only `add --text` needs torch and transformers (imported when used).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from safety_checker_admin.commands import DEFAULT_REPOSITORY
from safety_checker_admin.concept_store import (
    ConceptCommandError,
    builtin_thresholds,
    change,
    concept_file,
    configmap,
    read_set,
    restore,
)
from safety_checker_admin.concept_sync import check_server, connect, image_embeddings, served, wait_for_version
from safety_checker_client.client import DEFAULT_URLS, PROTOCOLS, SafetyCheckerClient
from safety_checker_served import concept_set
from safety_checker_served.concept_set import ConceptSet, ConceptSetError

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_WAIT_S = 30.0
# Default threshold of an image concept: this far below the least similar example.
IMAGE_THRESHOLD_MARGIN = 0.02
NAME_RULE = (
    "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit, and not concept_NN or special_care_N "
    "(the built-ins)"
)


def commit(
    args: argparse.Namespace,
    path: Path,
    edit: Callable[[ConceptSet], ConceptSet],
    client: SafetyCheckerClient,
    out: TextIO,
) -> ConceptSet:
    """Apply `edit` to the file under the lock, then wait for the server to serve the new set."""
    new = change(path, edit)
    print(f"wrote {path} (version {new.version})", file=out, flush=True)
    return confirm(args, path, new, client, out)


def confirm(
    args: argparse.Namespace, path: Path, new: ConceptSet, client: SafetyCheckerClient, out: TextIO
) -> ConceptSet:
    """Wait for the server to serve `new` (unless --no-wait)."""
    if args.no_wait:
        return new
    wait_for_version(client, new.version, args.wait_timeout, path)
    print(
        f"the server at {client.url} now serves version {new.version} "
        f"({len(new.concepts)} custom concept{'s' if len(new.concepts) != 1 else ''})",
        file=out,
        flush=True,
    )
    return new


# -- commands ------------------------------------------------------------------
def _add(args: argparse.Namespace, out: TextIO) -> int:
    if bool(args.image) == bool(args.text):
        raise ConceptCommandError(
            "give the examples as --image FILE (one or more) or the phrase as --text PHRASE (exactly one of the two)"
        )
    if args.text is not None and not args.text.strip():
        raise ConceptCommandError("--text is empty")
    if args.threshold is not None:
        try:
            concept_set.check_threshold(args.threshold, "--threshold")
        except ConceptSetError as error:
            raise ConceptCommandError(str(error)) from None
    if not concept_set.NAME_PATTERN.match(args.name) or concept_set.RESERVED_NAME.match(args.name):
        raise ConceptCommandError(f"--name {args.name!r}: a name is {NAME_RULE}")
    path = concept_file(args)
    current = read_set(path)
    # A phrase's default threshold comes from the repository: known (or refused) before any work is done.
    text_default = builtin_thresholds(args.repository) if args.text and args.threshold is None else None
    if current.get(args.name) is not None:
        raise ConceptCommandError(
            f"a concept named {args.name!r} already exists in {path} (version "
            f"{current.version}); remove it first or choose another name"
        )
    with connect(args.url, args.protocol) as client:
        check_server(client, current, path)
        if args.image:
            embeds, hashes = image_embeddings(client, args.image)
            source = {"kind": "images", "sha256": hashes}
            embedding = concept_set.unit_vector(embeds)
            if args.threshold is None:
                unit = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
                lowest = float(np.min(unit @ embedding))
                threshold = max(-1.0, math.floor((lowest - IMAGE_THRESHOLD_MARGIN) * 1000) / 1000)
                how = f"the least similar example's cosine {lowest:.3f} less {IMAGE_THRESHOLD_MARGIN}"
        else:
            from safety_checker_admin.text_embedding import TextEmbeddingError, embed_text

            try:
                embedding = embed_text(args.text, args.clip_model, client)
            except TextEmbeddingError as error:
                raise ConceptCommandError(str(error)) from None
            source = {"kind": "text", "text": args.text}
            if args.threshold is None:
                threshold = round(float(np.mean(text_default)), 3)
                how = "the mean threshold of the built-in concepts, which are text embeddings too"
        if args.threshold is not None:
            threshold, how = float(args.threshold), "--threshold"
        if embedding.shape[-1] != current.embedding_dim:
            raise ConceptCommandError(
                f"the embedding has {embedding.shape[-1]} values, the served image_embeds have {current.embedding_dim}"
            )
        try:
            concept = concept_set.make_concept(args.name, embedding, threshold, source, category=args.category)
        except ConceptSetError as error:
            raise ConceptCommandError(str(error)) from None
        print(
            f"concept {concept.name!r}: {concept.describe_source()}, category {concept.category!r}, "
            f"threshold {threshold:g} ({how})",
            file=out,
            flush=True,
        )
        commit(args, path, lambda s: s.with_concept(concept), client, out)
    return 0


def _remove(args: argparse.Namespace, out: TextIO) -> int:
    path = concept_file(args)
    current = read_set(path)
    if current.get(args.name) is None:
        raise ConceptCommandError(
            f"no concept named {args.name!r} in {path} (version {current.version}); it holds: "
            f"{', '.join(current.names) or 'none'}"
        )
    with connect(args.url, args.protocol) as client:
        check_server(client, current, path)
        commit(args, path, lambda s: s.without(args.name), client, out)
    print(f"removed concept {args.name!r}", file=out)
    return 0


def _set_threshold(args: argparse.Namespace, out: TextIO) -> int:
    try:
        concept_set.check_threshold(args.threshold, "--threshold")
    except ConceptSetError as error:
        raise ConceptCommandError(str(error)) from None
    path = concept_file(args)
    current = read_set(path)
    if current.get(args.name) is None:
        raise ConceptCommandError(f"no concept named {args.name!r} in {path} (version {current.version})")
    with connect(args.url, args.protocol) as client:
        check_server(client, current, path)
        commit(args, path, lambda s: s.with_threshold(args.name, args.threshold), client, out)
    print(f"concept {args.name!r} now has threshold {args.threshold:g}", file=out)
    return 0


def _restore(args: argparse.Namespace, out: TextIO) -> int:
    path = concept_file(args)
    try:
        older = concept_set.read(args.file)
    except ConceptSetError as error:
        raise ConceptCommandError(f"{error}; nothing was restored") from None
    with connect(args.url, args.protocol) as client:
        version, width = served(client)
        if width != older.embedding_dim:
            raise ConceptCommandError(
                f"{args.file} has embedding_dim {older.embedding_dim}, the server at {client.url} serves image "
                f"embeddings of width {width}; nothing was restored"
            )
        new = restore(path, older, version)
        print(
            f"wrote {path} (version {new.version}): the {len(new.concepts)} concepts of {args.file} "
            f"(version {older.version}): {concept_set.listing(new.names)}",
            file=out,
            flush=True,
        )
        confirm(args, path, new, client, out)
    return 0


def _list(args: argparse.Namespace, out: TextIO) -> int:
    path = concept_file(args)
    current = read_set(path)
    if args.json:
        summary = current.to_json()
        for concept in summary["concepts"]:
            del concept["embedding"]
        out.write(json.dumps(summary, indent=2) + "\n")
        return 0
    print(
        f"custom concept set version {current.version} ({path}): {len(current.concepts)} concept"
        f"{'s' if len(current.concepts) != 1 else ''}, embedding_dim {current.embedding_dim}",
        file=out,
    )
    if current.concepts:
        rows = [("NAME", "CATEGORY", "THRESHOLD", "CREATED", "SOURCE")]
        rows += [(c.name, c.category, f"{c.threshold:g}", c.created, c.describe_source()) for c in current.concepts]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4], file=out)
    return 0


def _export(args: argparse.Namespace, out: TextIO) -> int:
    path = concept_file(args)
    current = read_set(path)  # an invalid set is never exported
    manifest = configmap(args.configmap, args.namespace, path.read_text())
    if args.output is not None:
        args.output.write_text(manifest)
    else:
        out.write(manifest)
    print(
        f"ConfigMap {args.configmap!r}: custom concept set version {current.version} ({len(current.concepts)} "
        f"concepts) from {path}; roll it out with `kubectl apply -f {args.output or '-'}`",
        file=sys.stderr,
    )
    return 0


def _calibrate(args: argparse.Namespace, out: TextIO) -> int:
    from safety_checker_admin.calibrate import calibrate

    with connect(args.url, args.protocol) as client:
        return calibrate(
            client,
            Path(args.positive),
            Path(args.negative),
            name=args.name,
            target_fpr=args.target_fpr,
            plot=Path(args.plot),
            out=out,
        )


# -- argument parsing ----------------------------------------------------------
def _server_arguments(parser: argparse.ArgumentParser, wait: bool = True) -> None:
    parser.add_argument(
        "--url",
        metavar="HOST:PORT",
        help=f"the running server (default {DEFAULT_URLS['grpc']} for gRPC, {DEFAULT_URLS['http']} for HTTP: "
        "where make serve listens)",
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="grpc", help="how to talk to the server (default grpc)"
    )
    if wait:
        parser.add_argument(
            "--wait-timeout",
            type=float,
            default=DEFAULT_WAIT_S,
            metavar="SECONDS",
            help=f"how long to wait for the server to serve the new set (default {DEFAULT_WAIT_S:g})",
        )
        parser.add_argument(
            "--no-wait",
            action="store_true",
            help="do not wait for the server to serve the new set (a --concepts-dir that reaches the servers "
            "later, e.g. through a ConfigMap)",
        )


def _set_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--repository",
        type=Path,
        help=f"the model repository the server serves (default {DEFAULT_REPOSITORY}, where make serve exports)",
    )
    where.add_argument(
        "--concepts-dir",
        type=Path,
        metavar="DIR",
        help="a folder holding custom_concepts.json that every replica reads (exported with --concepts-dir), "
        "e.g. the source of a ConfigMap",
    )


def add_parser(commands) -> None:
    concepts = commands.add_parser(
        "concepts",
        help="manage the custom concept set of a served model repository",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    concepts.set_defaults(run=run)
    actions = concepts.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="add a concept from example images (embedded by the server) or a phrase")
    _set_location(add)
    _server_arguments(add)
    add.add_argument("--name", required=True, help=f"the new concept's name ({NAME_RULE})")
    add.add_argument(
        "--image",
        action="extend",
        nargs="+",
        metavar="FILE",
        help="example image; repeat (or list several) for more",
    )
    add.add_argument("--text", metavar="PHRASE", help="a phrase, embedded with the CLIP text encoder")
    add.add_argument(
        "--threshold",
        type=float,
        help="cosine threshold in [-1, 1] (default: images: the least "
        f"similar example's cosine less {IMAGE_THRESHOLD_MARGIN}; text: "
        "the mean built-in threshold)",
    )
    add.add_argument("--category", default=concept_set.DEFAULT_CATEGORY, help="free-form label (default: custom)")
    add.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP model for --text: hub id or local directory (default {DEFAULT_CLIP_MODEL}); its "
        "vision tower must be the served checker's",
    )

    listing = actions.add_parser("list", help="print the custom concept set")
    _set_location(listing)
    listing.add_argument("--json", action="store_true", help="print JSON (without the embeddings)")

    remove = actions.add_parser("remove", help="remove a concept")
    _set_location(remove)
    _server_arguments(remove)
    remove.add_argument("--name", required=True, help="the custom concept to remove")

    threshold = actions.add_parser(
        "set-threshold", help="change a concept's threshold (e.g. to what calibrate proposed)"
    )
    _set_location(threshold)
    _server_arguments(threshold)
    threshold.add_argument("--name", required=True, help="the custom concept whose threshold changes")
    threshold.add_argument("--threshold", required=True, type=float, help="its new cosine threshold, in [-1, 1]")

    restoring = actions.add_parser(
        "restore",
        help="roll back: publish an older concept file's concepts as the next version",
        description="Publish the concepts of FILE (an earlier custom_concepts.json, e.g. a backup or a ConfigMap's "
        "source in version control) as the next version: a server takes only a newer version, so a rollback is a "
        "new version with the old concepts. A file in place that does not validate is replaced.",
    )
    restoring.add_argument("file", type=Path, metavar="FILE", help="the concept file to restore")
    _set_location(restoring)
    _server_arguments(restoring)

    export = actions.add_parser(
        "export",
        help="print the concept set as a Kubernetes ConfigMap for every replica to mount",
        description="Print the custom concept set as a ConfigMap (YAML) holding custom_concepts.json, for "
        "`kubectl apply -f -`. Every replica mounts it and reads the set from there (a repository exported with "
        "--concepts-dir); an update reaches each replica through the kubelet's swap of the volume.",
    )
    _set_location(export)
    export.add_argument("--configmap", required=True, metavar="NAME", help="the ConfigMap's name")
    export.add_argument("--namespace", help="the ConfigMap's namespace (default: kubectl's)")
    export.add_argument("--output", type=Path, metavar="FILE", help="write here instead of standard output")

    calibrate = actions.add_parser(
        "calibrate",
        help="score labelled images and propose a threshold",
        description="Score the images in --positive (should fire) and --negative (should not) and propose a "
        "threshold: for --name, the cosine threshold of that custom concept; without it, a cut on the "
        "highest built-in concept score, given as the equivalent strictness adjustment.",
    )
    _server_arguments(calibrate, wait=False)
    calibrate.add_argument("--positive", required=True, metavar="DIR", help="images the concept should fire on")
    calibrate.add_argument("--negative", required=True, metavar="DIR", help="images it should not fire on")
    calibrate.add_argument("--name", help="a custom concept served now (default: the built-in concepts)")
    calibrate.add_argument(
        "--target-fpr",
        type=float,
        metavar="F",
        help="propose the threshold with the best recall whose false-positive rate is <= F "
        "(default: the threshold maximising F1)",
    )
    calibrate.add_argument(
        "--plot",
        default="calibration.png",
        metavar="FILE.png",
        help="where to write the histogram of both score distributions (default calibration.png)",
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    action = {
        "add": _add,
        "list": _list,
        "remove": _remove,
        "set-threshold": _set_threshold,
        "restore": _restore,
        "export": _export,
        "calibrate": _calibrate,
    }[args.action]
    if getattr(args, "repository", False) is None and getattr(args, "concepts_dir", None) is None:
        args.repository = Path(DEFAULT_REPOSITORY)  # neither given: where make serve exports
    try:
        return action(args, out)
    except ConceptCommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
