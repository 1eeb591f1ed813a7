"""sasgate: a gated SAE-steering experiment as reproducible, auditable software."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sasgate")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
