"""`python -m export`: checkpoint -> verified ONNX -> Triton model repository."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from export.checkpoint import DEFAULT_MODEL, CheckpointError, check_preprocessor, load_checkpoint
from export.environment import DEFAULT_WHEELHOUSE, EnvironmentBuildError, default_targets, stub_python
from export.graph import EmbedderGraph
from export.image_models import host_decoder_instances
from export.models import Settings
from export.onnx_export import DEFAULT_OPSET, DEFAULT_TOLERANCE, VerificationError, export_onnx, verify_onnx
from export.quantize import DEFAULT_CHECK_IMAGES, compare_int8, quantize_int8, summary
from export.repository import RepositoryError, concept_metadata, existing_custom_concepts, model_dims, write_repository
from safety_checker_client import spec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id or local directory saved with save_pretrained (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--repository", required=True, type=Path, help="model repository to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, at least 17")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest accepted |cosine(ONNX) - cosine(PyTorch)|"
    )
    parser.add_argument(
        "--strictness",
        choices=list(spec.STRICTNESS_PRESETS),
        default=spec.DEFAULT_STRICTNESS,
        help="strictness preset the server applies to requests that do not choose one "
        f"(default {spec.DEFAULT_STRICTNESS}: the reference checker's decisions)",
    )
    parser.add_argument(
        "--concepts-dir",
        default="",
        metavar="DIR",
        help="read the custom concept set from DIR/custom_concepts.json on the server instead of the "
        "postprocessor's version folder: a folder every replica shares, e.g. a ConfigMap mounted at "
        "/mnt/concepts (an absolute path as the server sees it)",
    )
    parser.add_argument(
        "--decoder-instances",
        type=int,
        default=None,
        metavar="N",
        help="CPU instances of safety_checker_decode, which decodes image files (default: one per core of this "
        f"host, {host_decoder_instances()}; give the serving host's count when the export runs elsewhere)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="serve a dynamically quantised int8 embedder (faster on CPU; can change decisions "
        "next to a threshold: the export measures and reports how often)",
    )
    parser.add_argument(
        "--cascade",
        action="store_true",
        help="serve the int8 embedder first and the fp32 one for every image whose decision int8's measured error "
        "bound could change: the fp32 checker's decisions at close to int8's speed",
    )
    parser.add_argument(
        "--int8-check-images",
        type=int,
        default=DEFAULT_CHECK_IMAGES,
        metavar="N",
        help=f"random inputs the int8 report runs (default {DEFAULT_CHECK_IMAGES})",
    )
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        default=DEFAULT_WHEELHOUSE,
        metavar="DIR",
        help="the pinned wheels (requirements/served.txt) the Python models' environments are built from, for "
        "Python 3.10 and this Python (default: .wheelhouse, which `make setup` fills)",
    )
    parser.add_argument(
        "--stub-python",
        metavar="PYTHON",
        help="build this Python's environments on PYTHON (same version), which the bundled server's stubs then "
        "run with its own packages only, as the NGC image's Python; default: this Python, with the packages of "
        "the virtualenv it runs in visible to them too",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.opset < 17:
        print(f"error: --opset {args.opset} is below 17", file=sys.stderr)
        return 2
    if args.decoder_instances is not None and args.decoder_instances < 1:
        print(f"error: --decoder-instances {args.decoder_instances} is below 1", file=sys.stderr)
        return 2
    decoder_instances = args.decoder_instances or host_decoder_instances()
    if args.concepts_dir and not args.concepts_dir.startswith("/"):
        print(f"error: --concepts-dir {args.concepts_dir!r} must be an absolute path on the server", file=sys.stderr)
        return 2
    try:
        targets = default_targets(stub_python(args.stub_python)) if args.stub_python else ()
        print(f"loading {args.model}", flush=True)
        checkpoint = load_checkpoint(args.model)
        check_preprocessor(checkpoint.preprocessor_config, checkpoint.source)
        dims = model_dims(checkpoint.model)
        existing_custom_concepts(args.repository, dims)  # refuse now, not after the ONNX export
        graph = EmbedderGraph(checkpoint.model)
        with tempfile.TemporaryDirectory(prefix="safety-checker-export-") as scratch:
            onnx_file = Path(scratch) / "model.onnx"
            print(f"exporting ONNX (opset {args.opset}, dynamic batch, fp32)", flush=True)
            export_onnx(graph, onnx_file, opset=args.opset)
            diff = verify_onnx(checkpoint.model, onnx_file, tolerance=args.tolerance)
            print(f"verified: max |cosine(ONNX) - cosine(PyTorch)| = {diff:.3g} (tolerance {args.tolerance:g})")
            metadata = concept_metadata(checkpoint.model, checkpoint.source)
            report = None
            onnx_files = {spec.EMBEDDER_MODEL: onnx_file}
            settings = Settings(
                strictness=args.strictness,
                concepts_dir=args.concepts_dir,
                cascade=args.cascade,
                int8=args.int8,
                decoder_instances=decoder_instances,
            )
            if args.int8 or args.cascade:
                int8_file = Path(scratch) / "model_int8.onnx"
                print("quantising to int8 (dynamic) and comparing with fp32", flush=True)
                quantize_int8(onnx_file, int8_file)
                report = compare_int8(onnx_file, int8_file, metadata, images=args.int8_check_images)
                print(summary(report))
                onnx_files[spec.INT8_EMBEDDER_MODEL if args.cascade else spec.EMBEDDER_MODEL] = int8_file
                settings = dataclasses.replace(settings, cosine_bound=report["cosine_bound"])
            print("packing the Python models' environments", flush=True)
            write_repository(
                args.repository,
                onnx_files,
                dims,
                metadata,
                settings,
                quantization=report,
                wheelhouse=args.wheelhouse,
                targets=targets,
            )
    except (CheckpointError, VerificationError, RepositoryError, EnvironmentBuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote model repository {args.repository} ({dims.num_concepts} concepts, "
        f"{dims.num_special} special-care concepts, projection_dim {dims.projection_dim}, "
        f"{'int8/fp32 cascade' if args.cascade else 'int8' if args.int8 else 'fp32'} embedder, "
        f"{decoder_instances} image decoders on CPU)"
    )
    return 0
