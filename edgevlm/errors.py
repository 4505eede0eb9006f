"""Typed errors for edgevlm.

Every error a user can meet is an ``EdgeVLMError`` subclass whose message names the problem *and* the fix.
The CLI catches ``EdgeVLMError`` and prints it without a traceback (exit code 2); anything else is a bug.
No third-party imports here: the device side (runtime, bundle reader) imports this module.
"""

from __future__ import annotations


class EdgeVLMError(Exception):
    """Base class of every error edgevlm raises on purpose."""


class ConfigError(EdgeVLMError, ValueError):
    """Unknown model / projector / target / precision name, or an inconsistent configuration."""


class CheckpointError(EdgeVLMError):
    """A checkpoint directory is missing, unreadable, or its tensors do not match the model."""

    def __init__(self, message: str, *, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mismatched: list[str] | None = None) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        parts = [message]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("wrongly shaped", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
                parts.append(f"{len(keys)} {label} tensor(s): {shown}")
        super().__init__("\n  ".join(parts))


class OutputError(ConfigError):
    """An output destination holds something edgevlm did not write (or must not replace without --overwrite)."""


class DataError(EdgeVLMError):
    """Training / evaluation / calibration data is missing or malformed."""


class ImageError(EdgeVLMError, ValueError):
    """An input image cannot be used (corrupt, empty, too large)."""


class PromptError(EdgeVLMError, ValueError):
    """A prompt cannot be used (no image placeholder, longer than the context, ...)."""


class BundleError(EdgeVLMError):
    """A bundle is missing, incomplete, tampered with, or of an unsupported schema version."""


class ExportError(EdgeVLMError):
    """Export to ONNX failed."""


class ExportMismatch(ExportError):
    """The exported graph does not reproduce the PyTorch model within tolerance."""

    def __init__(self, component: str, check: str, max_abs_diff: float, tolerance: float,
                 cosine: float | None = None) -> None:
        self.component, self.check = component, check
        self.max_abs_diff, self.tolerance, self.cosine = max_abs_diff, tolerance, cosine
        cos = f", cosine {cosine:.6f}" if cosine is not None else ""
        super().__init__(
            f"{component}: ONNX Runtime output differs from PyTorch on '{check}': max |diff| "
            f"{max_abs_diff:.3e} > tolerance {tolerance:.1e}{cos}. Re-export with --precision fp32 to isolate a "
            f"quantization error, or report the graph with `edgevlm inspect`.")


class QuantizationError(EdgeVLMError):
    """A quantization recipe cannot be applied (unsupported combination, calibration failure)."""


class TargetError(EdgeVLMError):
    """A model / precision / context does not fit or is not supported on a hardware target."""


class MissingDependency(EdgeVLMError, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package, self.extra = package, extra
        super().__init__(f"{purpose} needs the '{package}' package, which is not installed. "
                         f"Install it with: pip install 'edgevlm[{extra}]'")


class RuntimeBackendError(EdgeVLMError):
    """A runtime backend (ONNX Runtime provider, TensorRT) is unavailable or failed."""
