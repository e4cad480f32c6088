"""edgepack's on-device runtime: load a bundle, verify it, classify text, benchmark it.

Imports onnxruntime, tokenizers, numpy and the standard library only: it is copied into every bundle
and runs where edgepack (and torch) are not installed.

    >>> from runtime_shim import OnnxPipeline      # doctest: +SKIP
    >>> OnnxPipeline("bundle")("what is my balance")  # doctest: +SKIP
    [{'label': 'balance', 'score': 0.97}]

On the command line: ``python -m runtime_shim predict|bench|verify|rss BUNDLE ...``.
"""

from __future__ import annotations

from .manifest import BundleError

__version__ = "0.1.0"
__all__ = ["BundleError", "OnnxPipeline", "__version__"]


def __getattr__(name: str):
    # OnnxPipeline is imported on first use, not with the package: ``python -m runtime_shim verify`` and
    # ``unpack`` never load numpy.
    if name == "OnnxPipeline":
        from .pipeline import OnnxPipeline

        return OnnxPipeline
    raise AttributeError(f"module 'runtime_shim' has no attribute {name!r}")
