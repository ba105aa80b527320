"""Checks on command-line values that several subcommands share. Each raises ConfigError naming the flag and the
fix, and runs before any model or data loads: a value that cannot work should not cost a model load first, and an
output path that cannot be written should not cost the run that produced the output.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from fastchat_ft.errors import ConfigError, DataError


def flag_name(name: str) -> str:
    """argparse's dest back to the flag a user typed: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")


def check_range(value, flag: str, *, low=None, high=None, low_open: bool = False) -> None:
    """value lies in [low, high] (low excluded with low_open; None: no bound); NaN fails."""
    ok = (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:  # every comparison with NaN is False: NaN lands here
        lo = "" if low is None else f"{'above' if low_open else 'at least'} {low}"
        hi = "" if high is None else f"at most {high}"
        want = " and ".join(w for w in (lo, hi) if w)
        raise ConfigError(f"must be {want}, got {value}", field=flag,
                          fix=f"pass {flag} {want}, or leave it out for the default")


def at_least(args, least: dict[str, int | float]) -> None:
    """Each named argument, where given (not None), is a number >= its bound; NaN fails too."""
    for name, low in least.items():
        if getattr(args, name, None) is not None:
            check_range(getattr(args, name), flag_name(name), low=low)


def positive(args, names: tuple[str, ...] | list[str]) -> None:
    """Each named argument, where given, is a finite number > 0."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            check_range(value, flag_name(name), low=0, low_open=True)
            if not math.isfinite(value):
                raise ConfigError(f"must be a finite number, got {value}", field=flag_name(name),
                                  fix=f"pass a positive {flag_name(name)}, or leave it out for the default")


CWD_FIX = "check the path (a relative path is relative to the current folder)"


def input_file(path: str | Path, flag: str, fix: str = CWD_FIX) -> Path:
    """A file the command reads: it exists and is not a folder. Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise DataError("is a folder, not a file", file=str(p), field=flag, fix="pass a file (inside it?)")
    if not p.is_file():
        if str(path) == "-" or p.exists():  # "-", /dev/stdin or <(cmd) fed by a pipe: it is there, and unreadable twice
            raise DataError("not a regular file (standard input, a pipe or a device)", file=str(p), field=flag,
                            fix="save the data to a file and pass its path")
        raise DataError("file not found", file=str(p), field=flag, fix=fix)
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def writable_folder(folder: str | Path, flag: str, fix: str | None = None) -> None:
    """The folder (or, where it is still to be created, its nearest existing parent) can be written into: a read-only
    dataset folder is refused before the scan, not with a PermissionError traceback after it."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into the folder {p} (no write permission)", field=flag,
                          fix=fix or f"give {flag} a path in a folder you can write to")


def write_failed(e: OSError, path: str | Path, flag: str) -> ConfigError:
    """An OSError while writing an output (permissions, a read-only or full disk) as a user error."""
    return ConfigError(f"could not write {path}: {e.strerror or e}", field=flag,
                       fix=f"give {flag} a path in a folder you can write to, on a disk with free space")


def output_file(path: str | Path, flag: str, *, inputs=()) -> Path:
    """A file the command will write: not one of its inputs (nothing is overwritten that the run reads), not an
    existing folder, and in a folder that exists. Returns the path."""
    out = Path(path)
    for given in inputs:
        if given is None:
            continue
        given = Path(given)
        # an input folder (a model or tokenizer folder) is read whole: none of its files may be replaced
        inside = given.is_dir() and out.is_file() and given.resolve() in out.resolve().parents
        if inside or _same_file(out, given):
            raise ConfigError(f"{out} is also an input of this command; writing it would destroy that input",
                              field=flag, fix=f"give {flag} a new file name")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder", field=flag, fix=f"give {flag} a file path, e.g. {out / 'out'}")
    parent = out.parent  # Path("x").parent is Path(".")
    if not parent.is_dir():
        raise ConfigError(f"the folder {parent} does not exist", field=flag,
                          fix=f"create {parent} first, or give {flag} a path in an existing folder")
    writable_folder(parent, flag)
    return out


def output_folder(path: str | Path, flag: str) -> Path:
    """A folder the command will create or write into: not an existing file (or a path under one)."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{p} is a file, not a folder", field=flag,
                              fix=f"give {flag} a folder path (it is created if missing)")
    writable_folder(out, flag)
    return out
