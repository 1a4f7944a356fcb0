"""riskwire: real-time fraud inference server.

The import packages ``riskwire.kernels``, ``riskwire.pipeline``, ``riskwire.server``,
``riskwire.shadow``, ``riskwire.clients`` and ``riskwire.protos`` live in the
repository's top-level folders of the same names (see pyproject.toml).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("riskwire")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
