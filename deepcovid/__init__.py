"""deepcovid: fine-tune ImageNet backbones on chest X-rays and explain their predictions.

Research use only. Not a medical device.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402  (re-exported for `from deepcovid import ...`)
    CheckpointError,
    ConfigError,
    DataError,
    DeepCovidError,
    InvalidImageError,
    WeightsUnavailableError,
)

__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeepCovidError",
    "InvalidImageError",
    "WeightsUnavailableError",
]
