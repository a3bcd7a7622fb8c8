"""Error types users see.

Every failure caused by the user's input (a folder layout, a file, an option) raises a
`FrugalsegError` subclass with a message that names the file and says what to do. The CLI prints
those messages without a traceback; anything else is a bug and keeps its traceback.
"""


class FrugalsegError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class DataError(FrugalsegError):
    """A dataset, file or label is malformed or inconsistent."""


class ConfigError(FrugalsegError):
    """An option or configuration value is invalid."""


class OutputError(FrugalsegError):
    """An output file or folder cannot be written: disk full, quota, read-only file system, permission.

    The message names the file or folder the user asked for (never a temporary name) and the cause in words;
    `data.io.output_error` builds it from the operating system's error."""


def first_line(exc: BaseException, *, sentence: bool = False, limit: int = 200) -> str:
    """The first line of an exception's text (its type name when the text is empty), for a one-line message.

    `sentence`: only the first sentence of that line (torch appends paragraphs of advice to its errors)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if sentence:
        text = text.split(". ")[0].rstrip(".")
    return text[:limit]


class MissingDependencyError(FrugalsegError):
    """An optional dependency is needed for this feature."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the optional package '{package}'. "
            f"Install it with: pip install 'frugalseg[{extra}]'"
        )


def require(module: str, extra: str, feature: str):
    """Import an optional module or raise an install hint (optional parts import lazily)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(module.split(".")[0], extra, feature) from exc
