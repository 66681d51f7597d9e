"""User-facing errors: one line, named problem, non-zero exit. Tracebacks are for bugs."""
from __future__ import annotations


class HMUExportError(Exception):
    """Base for every error caused by user input or environment, not by a bug."""

    exit_code = 2


class ConfigError(HMUExportError):
    """A config file or field is missing, unknown, mistyped or inconsistent."""


class CheckpointError(HMUExportError):
    """A checkpoint is missing, corrupt, unsafe or does not match the config."""


class InputError(HMUExportError):
    """A feed violates the I/O contract: name, dtype, rank or shape outside the profile."""


class ArtifactError(HMUExportError):
    """An artifact folder or file is missing, unwritable or inconsistent with its manifest."""


class BackendUnavailable(HMUExportError):
    """A backend (TensorRT, CUDA, a provider) is not present on this machine."""


class GenerationError(HMUExportError):
    """Generation cannot go on: the model's logits hold NaN or infinity, or the token rules
    leave no token possible."""


class TrainingError(HMUExportError):
    """Training cannot go on (the loss or the weights became non-finite): nothing is written."""


class ParityFailure(HMUExportError):
    """A parity or correctness check failed."""

    exit_code = 1
