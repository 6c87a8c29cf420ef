"""On-disk cache of dataset index arrays (``.npy``), safe for concurrent builders.

Files are named ``{md5 of description}-{Class}-{suffix}``. Every array is written to a temporary
name and renamed into place, and the JSON description is renamed last, so a reader that finds
the description finds complete arrays; two processes building the same cache write identical
bytes, so whichever rename lands last is harmless. A cache is used only when its stored
description equals the requested one; anything else is ignored and rebuilt, with a message
naming the settings that differ (also when only a cache for the same data under other settings
exists, e.g. one prebuilt by ``tools/build_data_cache.py`` with other flags).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Optional

import numpy as np


def describe(fields: dict) -> tuple[str, str]:
    """Canonical JSON text of ``fields`` and its md5 hex digest."""
    text = json.dumps(fields, indent=4, sort_keys=False)
    return text, hashlib.md5(text.encode("utf-8")).hexdigest()


def _paths(cache_dir: str, base: str, names) -> tuple[str, dict[str, str]]:
    desc = os.path.join(cache_dir, f"{base}-description.json")
    return desc, {n: os.path.join(cache_dir, f"{base}-{n}.npy") for n in names}


def load(cache_dir: Optional[str], base: str, names, description: str,
         log=print) -> Optional[dict[str, np.ndarray]]:
    """Memory-mapped cached arrays, or None when absent, incomplete or built for other settings."""
    if not cache_dir:
        return None
    desc_path, paths = _paths(cache_dir, base, names)
    wanted = json.loads(description)
    if not os.path.isfile(desc_path):
        other = _closest_other_settings(cache_dir, base, wanted)
        if other is not None:  # e.g. prebuilt by tools/build_data_cache.py with other flags
            log(f"> not using index cache {other[0]}: it was built for other settings "
                f"({_differences(other[1], wanted)}); building new indices")
        return None
    stored = _read_json(desc_path)
    if stored != wanted:
        log(f"> ignoring index cache {desc_path}: it was built for other settings "
            f"({_differences(stored or {}, wanted)}); rebuilding")
        return None
    try:
        return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
    except (OSError, ValueError) as e:
        log(f"> ignoring unreadable index cache {desc_path} ({e}); rebuilding")
        return None


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _differences(stored: dict, wanted: dict) -> str:
    """``key: cached X, now Y`` for each setting that differs."""
    keys = [k for k in wanted if stored.get(k) != wanted[k]] or ["(unreadable description)"]
    return "; ".join(f"{k}: cached {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys)


def _closest_other_settings(cache_dir: str, base: str, wanted: dict) -> Optional[tuple[str, dict]]:
    """The cached description of the same kind and data (e.g. ``GPTDataset-train`` of the same
    ``dataset_path``) with the fewest differing settings, or None."""
    kind = base.split("-", 1)[1] + "-description.json"
    best = None
    for name in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else ():
        stored = _read_json(os.path.join(cache_dir, name)) if name.endswith("-" + kind) else None
        if not isinstance(stored, dict) or stored.get("dataset_path") != wanted.get("dataset_path"):
            continue
        differing = sum(stored.get(k) != v for k, v in wanted.items())
        if best is None or differing < best[0]:
            best = (differing, os.path.join(cache_dir, name), stored)
    return None if best is None else best[1:]


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(cache_dir: str, base: str, arrays: dict[str, np.ndarray], description: str) -> None:
    """Write ``arrays`` then the description, each atomically (temporary file + rename)."""
    os.makedirs(cache_dir, exist_ok=True)
    desc_path, paths = _paths(cache_dir, base, arrays)
    for name, arr in arrays.items():
        _atomic_write(paths[name], lambda f, a=arr: np.save(f, np.ascontiguousarray(a),
                                                            allow_pickle=False))
    _atomic_write(desc_path, lambda f: f.write(description.encode("utf-8")))
