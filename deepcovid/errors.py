"""Typed errors. Every error a user can cause derives from DeepCovidError, so the CLI and
the web app can show its message instead of a traceback."""


class DeepCovidError(Exception):
    """Base class for errors caused by input, configuration or environment (not bugs)."""


class ConfigError(DeepCovidError, ValueError):
    """A flag, option value or preset is invalid."""


class DataError(DeepCovidError):
    """A dataset folder cannot be used for training or evaluation."""


class InvalidImageError(DeepCovidError, ValueError):
    """An image cannot be read: corrupt, unsupported, empty, too large, ..."""


class CheckpointError(DeepCovidError):
    """A checkpoint is missing, corrupt, tampered with, or of an unknown format."""


class WeightsUnavailableError(DeepCovidError):
    """Pretrained weights could not be obtained (usually: no internet)."""


def check_choice(value, choices, what: str) -> str:
    """``value`` normalised (stripped, lower-case) if it is one of ``choices``, else a ConfigError naming them."""
    key = str(value).strip().lower()
    if key not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose from: {', '.join(choices)}")
    return key
