"""r2r: FashionR2R from research script to production."""

__version__ = "0.1.0"
