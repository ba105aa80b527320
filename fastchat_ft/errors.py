"""Exception types for users: each carries where the problem is (file, line, field) and how to fix it.

The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class FastchatError(Exception):
    """A problem the user can fix. `str()` gives the full message: location, reason, fix."""

    def __init__(self, reason: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, field: str | None = None, fix: str | None = None):
        self.reason, self.file, self.line, self.column = reason, file, line, column
        self.field, self.fix = field, fix
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file:
            where = str(self.file)
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        field = f"field '{self.field}': " if self.field else ""
        fix = f"\n  fix: {self.fix}" if self.fix else ""
        return f"{where}{field}{self.reason}{fix}"


class ConfigError(FastchatError):
    """A bad training config key or value."""


class DataError(FastchatError):
    """A bad dataset record (JSON syntax, schema, roles, content)."""


class TokenizerError(FastchatError):
    """A tokenizer.json the native tokenizer cannot load exactly."""


class ModelError(FastchatError):
    """A model folder that cannot be loaded or trained as asked."""


class NotBuiltYet(FastchatError):
    """A subcommand that exists in the CLI but whose implementation has not landed."""
