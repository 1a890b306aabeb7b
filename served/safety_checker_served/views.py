"""Which view answers for a file: its first flagged view, else its first (frame 0 as a viewer composites it).

The decoder makes one or more views of each file (every frame; a frame that
is not opaque composited and with its alpha dropped) and says, per view, the
file's index in its request, the frame and whether alpha was dropped. After
every view was checked, each file is answered by one of them, so a file is
flagged when any of its views is, and the answer says which view it is.
"""

from __future__ import annotations

import json
from typing import List, Tuple

import numpy as np


def chosen(flagged: np.ndarray, views: np.ndarray) -> Tuple[np.ndarray, List[bytes]]:
    """(the row answering each file [N], each file's `view` JSON) for one request's views.

    `flagged`: bool [M] per view; `views`: int [M, 3] (file index, frame, alpha dropped), files numbered 0..N-1
    in order, each file's views in order (frame by frame, composited first)."""
    owner = views[:, 0]
    rows, described = [], []
    for index in range(int(owner.max()) + 1 if len(owner) else 0):
        mine = np.flatnonzero(owner == index)
        if len(mine) == 0:
            raise ValueError(f"file {index} of the request has no view")
        hits = mine[flagged[mine]]
        row = int(hits[0]) if len(hits) else int(mine[0])
        frame, dropped = int(views[row, 1]), bool(views[row, 2])
        twice = int(np.count_nonzero(views[mine, 1] == frame)) > 1
        transparency = ("dropped" if dropped else "composited") if twice else None
        view = {"frame": frame, "frames": len(set(views[mine, 1].tolist())), "transparency": transparency}
        view["views"] = len(mine)
        rows.append(row)
        described.append(json.dumps(view, separators=(",", ":")).encode())
    return np.array(rows, dtype=np.int64), described
