"""spark-cluster: one reliable vLLM endpoint from two or more DGX Spark / GB10 boxes."""

__version__ = "0.1.0"
