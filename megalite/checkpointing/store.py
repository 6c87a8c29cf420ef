"""The checkpoint directory protocol, shared by training and the converters.

Layout under a root (``--save DIR``)::

    DIR/latest_checkpointed_iteration.txt   the latest complete iteration, written last
    DIR/iter_0000010/...                    the files of iteration 10, and manifest.json:
                                            bytes and sha256 of every file

Writing: :func:`begin` makes a fresh ``DIR/.iter_0000010.tmp``; files go there through
:func:`save_file`; :func:`commit` writes the manifest, fsyncs, renames the directory into place
and rewrites the tracker (temp + rename). A crash at any point leaves the previous checkpoint
loadable. Reading: :func:`open_latest` finds the directory and its manifest, and
:func:`load_verified` checks a file against the manifest before unpickling it with
``weights_only=True`` (no code from a checkpoint can run).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import torch

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    """The latest complete checkpoint's iteration in ``root``, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def file_digest(path: str) -> str:
    """sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    """Make a directory entry (rename, new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj, path: str) -> dict:
    """torch.save + fsync; returns the manifest entry (size and sha256) of the file."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "sha256": file_digest(path)}


def verify_file(path: str, entry: dict) -> None:
    """Raise a clear error when a checkpoint file is missing, truncated or corrupted."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ValueError(f"checkpoint file {path} is truncated or changed: {size} bytes, expected {entry['bytes']}")
    if file_digest(path) != entry["sha256"]:
        raise ValueError(f"checkpoint file {path} is corrupted: sha256 does not match the manifest")


def temp_dir(root: str, iteration: int) -> str:
    """Where the files of ``iteration`` are written before :func:`commit`."""
    return os.path.join(root, f".iter_{iteration:07d}.tmp")


def begin(root: str, iteration: int) -> str:
    """A fresh, empty :func:`temp_dir` for the files of ``iteration`` (call on one process)."""
    tmp = temp_dir(root, iteration)
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(root: str, iteration: int, tmp: str, manifest: dict, keep_last: int | None = None) -> str:
    """Write ``manifest`` into ``tmp``, move ``tmp`` into place as ``iter_XXXXXXX`` and update
    the tracker last; with ``keep_last`` remove all but the newest checkpoints."""
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    final = iteration_dir(root, iteration)
    if os.path.exists(final):  # re-saving an iteration: move the old one aside first
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.rename(final, final + ".old")
    os.rename(tmp, final)
    _write_tracker(root, iteration)
    shutil.rmtree(final + ".old", ignore_errors=True)
    if keep_last:
        _remove_old(root, keep_last)
    return final


def _write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    fsync_dir(root)


def _remove_old(root: str, keep_last: int) -> None:
    iterations = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
    for it in iterations[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def open_latest(root: str) -> tuple[int, str, dict] | None:
    """``(iteration, directory, manifest)`` of the latest checkpoint under ``root``; None if none."""
    it = read_tracker(root)
    if it is None:
        return None
    directory = iteration_dir(root, it)
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: {path} is missing")
    with open(path) as f:
        return it, directory, json.load(f)


def load_verified(directory: str, manifest: dict, name: str, mmap: bool = False, allow: tuple = ()):
    """The object in file ``name`` of a checkpoint, after checking it against the manifest.

    Unpickled with ``weights_only=True``: tensors, dicts, lists, tuples, strings and numbers
    only (plus the ``allow``-listed classes), so a crafted file cannot run code; it is refused
    with one error naming it."""
    path = _verified_path(directory, manifest, name)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(f"checkpoint file {path} holds more than tensors and plain data; refusing to load it "
                         f"(nothing in it was run): {reason}") from None


def load_json(directory: str, manifest: dict, name: str):
    """A JSON file of a checkpoint, after checking it against the manifest."""
    with open(_verified_path(directory, manifest, name)) as f:
        return json.load(f)


def _verified_path(directory: str, manifest: dict, name: str) -> str:
    if name not in manifest:
        raise FileNotFoundError(f"checkpoint {directory} has no {name} in its manifest")
    path = os.path.join(directory, name)
    verify_file(path, manifest[name])
    return path
