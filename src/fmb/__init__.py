"""fmb: the Foundation Models Benchmark for astronomy."""

__version__ = "0.1.0"
