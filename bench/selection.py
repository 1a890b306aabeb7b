"""`--rows`: which rows of the benchmark one run measures, and what those rows need set up.

A full `make bench` takes over an hour on a 2-core machine; a question about
one ratio (say `encoded_vs_pixels`, from `--rows triton,images`) needs only
the rows it divides. Each name below selects a group of rows and says which
repositories it needs exported and served; the run sets up those and nothing
else, and its summary holds the ratios its rows allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Tuple

# The repositories the benchmark can export, in the order it exports and starts them.
REPOSITORIES = ("fp32", "int8", "cascade", "tiny")


@dataclass(frozen=True)
class RowGroup:
    """One name `--rows` accepts: the row kinds it measures and the repositories it exports and serves."""

    help: str
    kinds: Tuple[str, ...]
    exports: Tuple[str, ...] = ()
    serves: Tuple[str, ...] = ()


ROWS: Dict[str, RowGroup] = {
    "diffusers": RowGroup("diffusers forward() in-process (the baseline)", ("baseline",)),
    "ort": RowGroup("onnxruntime fp32 in-process", ("ort",), exports=("fp32",)),
    "ort-int8": RowGroup("onnxruntime int8 in-process", ("ort-int8",), exports=("int8",)),
    "decoder": RowGroup("the served decoding alone, PNG and JPEG", ("decoder",), exports=("fp32",)),
    "triton": RowGroup("served fp32 pixels (perf_analyzer)", ("triton",), exports=("fp32",), serves=("fp32",)),
    "triton-int8": RowGroup(
        "served int8 pixels (perf_analyzer)", ("triton-int8",), exports=("int8",), serves=("int8",)
    ),
    "images": RowGroup(
        "served fp32 image files, PNG+JPEG (load generator; encoded_vs_pixels needs triton too)",
        ("triton-images",),
        exports=("fp32",),
        serves=("fp32",),
    ),
    # `safety-checker gateway` in front of the fp32 server, fed the images row's files as the seed's callers send.
    "gateway": RowGroup(
        "the gateway's seed route, the same files base64 in JSON (load generator; gateway_vs_triton needs images too)",
        ("gateway",),
        exports=("fp32",),
        serves=("fp32",),
    ),
    # The cascade's forced-fallback bounds are found on the int8 server.
    "cascade": RowGroup(
        "served cascade, as exported and at forced fallbacks (perf_analyzer)",
        ("cascade", "cascade-forced"),
        exports=("int8", "cascade"),
        serves=("int8", "cascade"),
    ),
    # The tiny checker's paths side by side: the embedder alone, the ensembles, image files, the gateway.
    "pipeline": RowGroup(
        "the serving pipeline's own ceiling on the tiny checker: embedder alone, float, uint8 and image-file "
        "ensembles (perf_analyzer, batch 1 and 8) and the gateway",
        ("pipeline", "pipeline-gateway"),
        exports=("tiny",),
        serves=("tiny",),
    ),
    # Against the served checker and a tiny one (with --quick the served checker is the tiny one).
    "scan": RowGroup(
        "`safety-checker scan` over real-size files (scan_vs_server needs triton too)",
        (),
        exports=("fp32", "tiny"),
        serves=("fp32", "tiny"),
    ),
}


@dataclass(frozen=True)
class Selection:
    """The row groups one run measures."""

    names: FrozenSet[str]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @property
    def kinds(self) -> FrozenSet[str]:
        """The kinds of the rows this selection yields in results.json."""
        return frozenset(kind for name in self.names for kind in ROWS[name].kinds)

    def exports(self, quick: bool) -> List[str]:
        """The repositories to export, in REPOSITORIES order (with --quick, fp32 for the tiny one)."""
        return self._repositories([ROWS[name].exports for name in self.names], quick)

    def serves(self, quick: bool) -> List[str]:
        """The repositories to serve, in REPOSITORIES order."""
        return self._repositories([ROWS[name].serves for name in self.names], quick)

    @staticmethod
    def _repositories(needs: List[Tuple[str, ...]], quick: bool) -> List[str]:
        """With --quick the fp32 repository is the tiny checker, and stands in for the tiny one."""
        wanted = {repository for need in needs for repository in need}
        if quick and "tiny" in wanted:
            wanted = (wanted - {"tiny"}) | {"fp32"}
        return [r for r in REPOSITORIES if r in wanted]


ALL = Selection(frozenset(ROWS))


def parse(text: str) -> Selection:
    """`all` or a comma-separated list of ROWS names."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if names == {"all"}:
        return ALL
    unknown = sorted(names - set(ROWS))
    if unknown or not names:
        raise ValueError(f"unknown rows {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(ROWS)}")
    return Selection(frozenset(names))


def describe() -> str:
    """The --rows help: every name and what it measures."""
    return "; ".join(f"{name}: {group.help}" for name, group in ROWS.items())
