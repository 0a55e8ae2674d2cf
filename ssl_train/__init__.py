"""SimCLRv2 semi-supervised training at cluster scale (training side of ssl-train)."""

__version__ = "0.1.0"
