"""Writing files safely. Text and JSON: a reader (or a crash) sees the old content or the new, never half of it
(the text goes to a sibling `<name>.tmp` first, then one rename puts it in place, atomic within a file system).
Staged folders: the normal file modes before they are renamed into place."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj, **dumps_kwargs) -> None:
    write_text_atomic(path, json.dumps(obj, **dumps_kwargs))


def readable_by_all(folder: str | os.PathLike) -> None:
    """The normal umask-based modes for a folder written in staging: tempfile.mkdtemp makes it 0700 and some
    writers (safetensors' temp files) leave 0600, while a model or checkpoint is often read by another user (a
    serving container, a teammate)."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
