"""The config package's exceptions: every one names the file, the key path and the line."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration file that cannot be used. Permanent: the user must fix the file."""

    def __init__(
        self, message: str, *, file: str | None = None, key: str | None = None, line: int | None
    ) -> None:
        self.message = message
        self.file = file
        self.key = key
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigErrors(ConfigError):
    """Several problems found at once; str() lists them one per line."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.message, file=first.file, key=first.key, line=first.line)

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(error) for error in self.errors)
