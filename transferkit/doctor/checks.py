"""The file-level checks of `transferkit doctor`: each takes plain inputs and returns JSON-ready findings."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from transferkit.data.images import open_image_file
from transferkit.data.sources import MIN_CLASS_IMAGES, Sample, Skipped

HELD_OUT = ("val", "test")
BLOCK_ROWS = 1024  # similarity rows per block: memory stays O(block x N) however many images there are


def file_entry(sample: Sample) -> dict:
    return {"path": sample.path, "label": sample.label, "split": sample.split}


# what every scan leaves out by design (a Mac's .DS_Store, an unzipped archive's __MACOSX): no finding to fix
LEFT_OUT_BY_DESIGN = frozenset({"hidden file", "hidden folder", "system folder"})


def skipped_files(skipped: Sequence[Skipped]) -> list[dict]:
    """What the scan left out (unreadable, not an image, outside the layout), with its reason; hidden files and
    system folders are not findings (`ignored_note` counts them)."""
    return [{"path": s.path, "reason": s.reason} for s in skipped if s.reason not in LEFT_OUT_BY_DESIGN]


def ignored_note(skipped: Sequence[Skipped]) -> list[str]:
    ignored = sum(s.reason in LEFT_OUT_BY_DESIGN for s in skipped)
    what = "hidden file or system folder" if ignored == 1 else "hidden files or system folders"
    return [f"{ignored} {what} (.DS_Store, __MACOSX, …) left out, as train leaves them out"] if ignored else []


def exact_duplicates(samples: Sequence[Sample], contents: Sequence[list[int]]) -> list[dict]:
    """Groups of files with identical content, largest first."""
    found = [{"files": [file_entry(samples[row]) for row in rows]} for rows in contents if len(rows) > 1]
    return sorted(found, key=lambda group: -len(group["files"]))


def near_duplicates(samples: Sequence[Sample], contents: Sequence[list[int]], vectors: np.ndarray,
                    threshold: float) -> list[dict]:
    """Groups of distinct images whose embeddings reach `threshold` cosine similarity, chained through pairs.

    Exact copies count as one image (so they never form a group of their own); a group lists every file of its
    images and its weakest linking pair as `similarity`."""
    first, second, sims = similar_pairs(vectors[[rows[0] for rows in contents]], threshold)
    found = []
    for members, weakest in linked_groups(len(contents), first, second, sims):
        files = [file_entry(samples[row]) for member in members for row in contents[member]]
        found.append({"similarity": round(weakest, 4), "files": files})
    return sorted(found, key=lambda group: (-group["similarity"], group["files"][0]["path"]))


def similar_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows i, rows j, cosine) of every pair i < j at or above `threshold`, computed in blocks of rows."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    parts = [(np.empty(0, int), np.empty(0, int), np.empty(0, np.float32))]
    for start in range(0, len(unit), BLOCK_ROWS):
        sims = unit[start : start + BLOCK_ROWS] @ unit.T
        rows, cols = np.nonzero(sims >= threshold)
        once = cols > rows + start  # each pair once, never an image with itself
        rows, cols = rows[once], cols[once]
        parts.append((rows + start, cols, sims[rows, cols]))
    first, second, values = (np.concatenate(column) for column in zip(*parts, strict=True))
    return first, second, values


def linked_groups(n: int, first: np.ndarray, second: np.ndarray, sims: np.ndarray) -> list[tuple[list[int], float]]:
    """Connected components (of 2 or more) of the pair graph, each with its lowest pair similarity."""
    graph = coo_matrix((np.ones(len(first)), (first, second)), shape=(n, n))
    count, component = connected_components(graph, directed=False)
    weakest = np.full(count, np.inf)
    np.minimum.at(weakest, component[first], sims)
    members: dict[int, list[int]] = defaultdict(list)
    for node, label in enumerate(component):
        members[label].append(node)
    return [(nodes, float(weakest[label])) for label, nodes in members.items() if len(nodes) > 1]


def leakage(exact: Sequence[dict], near: Sequence[dict]) -> list[dict]:
    """The same image (exact copy, or near duplicate) both in train and in val/test: held-out scores it flatters.

    Near groups already hold every copy of their images, so an exact group inside one is not counted twice."""
    in_near = {f["path"] for group in near for f in group["files"]}
    same_image = [("near", group["files"]) for group in near]
    same_image += [("exact", group["files"]) for group in exact if group["files"][0]["path"] not in in_near]
    leaks = []
    for kind, files in same_image:
        train = [f["path"] for f in files if f["split"] == "train"]
        held_out = [{"path": f["path"], "split": f["split"]} for f in files if f["split"] in HELD_OUT]
        if train and held_out:
            leaks.append({"kind": kind, "train": train, "held_out": held_out})
    return leaks


def class_balance(samples: Sequence[Sample], classes: Sequence[str], max_ratio: float) -> dict:
    """Images per class (over all splits) and largest / smallest; flagged above `max_ratio`, with an empty class, or
    where `train` would refuse the data (`problem`: one class, a class of fewer than 2 images)."""
    tally = Counter(s.label for s in samples)
    counts = {name: tally[name] for name in classes}
    largest, smallest = max(counts.values()), min(counts.values())
    ratio = largest / smallest if smallest else None
    few = [f"{name} has {count}" for name, count in counts.items() if count < MIN_CLASS_IMAGES]
    problem = ("one class only: train needs at least 2" if len(counts) < 2 else
               f"train needs at least {MIN_CLASS_IMAGES} images per class ({', '.join(few)})" if few else None)
    return {
        "counts": counts,
        "ratio": None if ratio is None else round(ratio, 2),
        "max_ratio": max_ratio,
        "flagged": problem is not None or ratio is None or ratio > max_ratio,
        "problem": problem,
    }


def tiny_images(samples: Sequence[Sample], min_side: int) -> list[dict]:
    """Images with a side below `min_side` pixels: upscaled that far, they carry little the backbone can use."""
    found = []
    for sample in samples:
        width, height = pixel_size(sample.path)
        if min(width, height) < min_side:
            found.append({**file_entry(sample), "width": width, "height": height})
    return found


def pixel_size(path: str) -> tuple[int, int]:
    """Width and height from the header alone (the scan has already decoded the file once)."""
    with open_image_file(path) as handle, Image.open(handle) as image:
        return image.size
