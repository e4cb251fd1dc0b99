"""The AmNets RNN-T model (Macoskey et al., Interspeech 2021) built on amnets_kernels.

The switching encoder, arbitrator, training and streaming inference land with issue 6; this package
is installed now so that `import amnets` works from the first release.
"""

__version__ = "0.1.0"
