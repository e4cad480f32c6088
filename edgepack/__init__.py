"""edgepack: distill, prune, quantize and bundle transformer text classifiers for edge CPUs."""

__version__ = "0.1.0"
