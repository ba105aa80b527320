"""Write a file so that a reader (or a crash) sees the old content or the new, never half of it: the text goes to a
sibling `<name>.tmp` first, then one rename puts it in place (rename is atomic within a file system)."""
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
