"""Evaluation results stored as they are done, under a key of everything they depend on, for ``--resume``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from anofpdm.atomic import atomic_path
from anofpdm.evaluation.methods import EvaluationSettings

__all__ = ["source_digest", "run_key", "store_result", "stored_result", "store_case", "stored_case"]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the anofpdm sources (every part), part of the resume key


def source_digest(root: Path = PACKAGE_ROOT) -> str:
    """A digest of the library's Python sources under ``root`` (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(model_path: Path, methods: Sequence[str], settings: EvaluationSettings) -> str:
    """What a stored case result depends on besides the case: the model file's bytes, the methods, the
    settings (the tuned thresholds included) and the library's code (a changed method must not be mixed with
    results of the old one)."""
    digest = hashlib.sha256(model_path.read_bytes())
    digest.update(source_digest().encode())
    scoring = asdict(replace(settings, overlay_cases=0))  # which cases are drawn changes no number
    digest.update(json.dumps({"methods": list(methods), "settings": scoring}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def store_result(path: Path, key: str, name: str, value: Any) -> None:
    """Write ``{"key": key, name: value}`` atomically (a stopped run leaves either the whole file or none)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key": key, name: value}, indent=1))


def stored_result(path: Path, key: str, name: str, what: str) -> Any:
    """The value ``store_result`` wrote under the same key, else None; a damaged file is named, never overwritten."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not a stored {what} ({exc}); delete it to recompute it") from exc
    return stored.get(name) if stored.get("key") == key else None


def store_case(case_dir: Path, key: str, record: dict[str, Any]) -> None:
    """Store one case's record as ``case_dir/<case>.json``."""
    store_result(case_dir / f"{record['case']}.json", key, "record", record)


def stored_case(case_dir: Path, key: str, case_id: str) -> dict[str, Any] | None:
    """A scored record of ``case_id`` stored under the same key, else None (failures are always recomputed)."""
    record = stored_result(case_dir / f"{case_id}.json", key, "record", "case result")
    return record if record is not None and "error" not in record else None
