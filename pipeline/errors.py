"""Errors of the build pipeline.

PipelineError
├── DataValidationError      the input data is unusable (names column and rows)
├── PackageIntegrityError    a model package is incomplete or was tampered with
└── BuildConfigError         the build configuration is invalid
"""


class PipelineError(Exception):
    """Base class of every error the build pipeline reports to its user."""


class DataValidationError(PipelineError):
    """The raw data cannot be used; the message names the column and rows affected."""


class PackageIntegrityError(PipelineError):
    """A model package is missing a file, has an extra one, or a hash does not match."""


class BuildConfigError(PipelineError):
    """A build configuration value is missing, of the wrong type or out of range."""
