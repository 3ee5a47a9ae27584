"""The config package's exceptions: every one names the file, the key path, the line and, where
the parser knows it, the column."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration file that cannot be used. Permanent: the user must fix the file."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        line: int | None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.key = key
        self.line = line
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigErrors(ConfigError):
    """Several problems found at once; str() lists them one per line, in file order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.line or 0, e.column or 0))
        first = self.errors[0]
        super().__init__(
            first.message, file=first.file, key=first.key, line=first.line, column=first.column
        )

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(error) for error in self.errors)
