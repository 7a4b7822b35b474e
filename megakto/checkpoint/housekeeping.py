"""Finding the complete tags in a checkpoints directory, and deleting what is no longer wanted: old
tags beyond ``checkpoint.keep_last``, their universal forms, and what crashed saves left behind.
Rank 0 deletes; the listing is read by every caller alike."""

from __future__ import annotations

import os
import shutil

from megakto.checkpoint.manifest import TMP_PREFIX, UNIVERSAL, UNIVERSAL_PREFIX, problem, read_manifest, tag_step

__all__ = ["complete_tags", "newest_complete", "prune", "drop_universal", "remove_stale"]


def complete_tags(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step-*`` directory with a manifest, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        step = tag_step(name)
        path = os.path.join(ckpt_dir, name)
        if step is not None and os.path.isdir(path) and read_manifest(path) is not None:
            found.append((step, path))
    return sorted(found)


def newest_complete(ckpt_dir: str) -> str | None:
    """The newest tag that passes :func:`~megakto.checkpoint.manifest.problem`; damaged newer ones
    are skipped."""
    for _, path in reversed(complete_tags(ckpt_dir)):
        if problem(path) is None:
            return path
    return None


def prune(ckpt_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete tags; returns what was deleted.

    The newest complete tag is never deleted, whatever ``keep_last`` says. Directories without a
    manifest are not touched here (an unfinished save is a ``.tmp-*`` directory; see
    :func:`remove_stale`). A deleted tag's universal form beside it goes too
    (:func:`drop_universal`)."""
    tags = complete_tags(ckpt_dir)
    doomed = [path for _, path in tags[: max(0, len(tags) - max(1, keep_last))]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        drop_universal(path)
    return doomed


def drop_universal(tag_dir: str) -> None:
    """Delete ``universal-<tag>`` beside ``tag_dir`` when it was converted from ``tag_dir`` (its
    manifest's ``source``), now that the tag is pruned or saved again: it would hold the old weights
    and Adam moments (12 bytes a parameter) after its source is gone. A universal form of another
    run's tag, or one without a manifest, is left alone."""
    tag_dir = os.path.abspath(tag_dir)
    path = os.path.join(os.path.dirname(tag_dir), UNIVERSAL_PREFIX + os.path.basename(tag_dir))
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("format") == UNIVERSAL and manifest.get("source") == tag_dir:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale(ckpt_dir: str) -> list[str]:
    """Delete ``.tmp-*`` entries left by crashed saves. Only call it when no save is running."""
    if not os.path.isdir(ckpt_dir):
        return []
    stale = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.startswith(TMP_PREFIX)]
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return stale
