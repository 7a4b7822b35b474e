"""The stages of a universal conversion (megakto.checkpoint.universal), recorded as they finish so
that a conversion killed midway continues where it stopped instead of starting over.

The work folder ``.tmp-universal-<tag>/`` holds the folder being written and ``stages.json``: which
save it converts (the source's path, its manifest's checksum, the expert names), the stages finished
in order, and the size, modification time and sha256 of every file written so far, taken right after
its stage (as a save checksums each file right after writing it). A record of another source, or
none, starts the work over; a file whose size or time no longer matches its record is hashed again
at the commit. Files are fsynced before their stage is recorded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

from megakto.checkpoint.manifest import file_digest
from megakto.checkpoint.saving import _fsync, _write_atomic

__all__ = ["RECORD", "FAULT_ENV", "Stages"]

RECORD = "stages.json"
# Test-only fault injection: the conversion exits right after recording the stage named here.
FAULT_ENV = "MEGAKTO_FAULT_EXIT_IN_CONVERT"
_SCRATCH = "tmp"  # ds_to_universal's extracted fragments inside the folder: fsynced, not hashed (deleted)


class Stages:
    """The record of one conversion into ``staged`` (inside ``work``) of the save ``key`` names."""

    def __init__(self, work: str, staged: str, key: dict):
        self.work, self.staged, self.path = work, staged, os.path.join(work, RECORD)
        record = _read(self.path)
        if record is None or record.get("key") != key:
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            record = {"key": key, "done": [], "files": {}}
        self.record = record

    @property
    def done(self) -> list[str]:
        return list(self.record["done"])

    def run(self, stage: str, work: Callable[[], None]) -> None:
        """``work()`` unless ``stage`` is finished already; then record it."""
        if stage not in self.record["done"]:
            work()
            self.finished(stage)

    def finished(self, stage: str) -> None:
        """Record ``stage`` as finished: the files it wrote fsynced and hashed first."""
        files = self.record["files"]
        for folder, _, names in os.walk(self.staged):
            for name in names:
                path = os.path.join(folder, name)
                rel, stat = os.path.relpath(path, self.staged), os.stat(path)
                if files.get(rel, [None, None])[:2] == [stat.st_size, stat.st_mtime_ns]:
                    continue
                _fsync(path)
                if rel.split(os.sep, 1)[0] != _SCRATCH:
                    files[rel] = [stat.st_size, stat.st_mtime_ns, file_digest(path)]
        self.record["done"].append(stage)
        _write_atomic(self.path, json.dumps(self.record, indent=1))
        if os.environ.get(FAULT_ENV) == stage:
            os._exit(1)

    def digests(self) -> dict[str, str]:
        """The recorded checksums of the files still as they were recorded (relative paths)."""
        found = {}
        for rel, (size, mtime, digest) in self.record["files"].items():
            path = os.path.join(self.staged, rel)
            if os.path.isfile(path) and [os.path.getsize(path), os.stat(path).st_mtime_ns] == [size, mtime]:
                found[rel] = digest
        return found


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("done"), list) and isinstance(record.get("files"), dict)
    return record if ok else None

