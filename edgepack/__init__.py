"""edgepack: distill, prune, quantize and bundle transformer text classifiers for edge CPUs.

``edgepack.build`` (teacher -> verified bundle), ``edgepack.pack`` (a classifier -> bundle) and
``edgepack.load`` (a bundle -> a pipeline that classifies); see ``edgepack.api``.
"""

__version__ = "0.1.0"

from edgepack.api import BuildConfig, BuildResult, DataConfig, PackConfig, build, build_config, load, pack  # noqa: E402

__all__ = ["BuildConfig", "BuildResult", "DataConfig", "PackConfig", "__version__", "build", "build_config", "load",
           "pack"]
