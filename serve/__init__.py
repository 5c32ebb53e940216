"""`r2r-serve`: the Translator as an HTTP service on Ray Serve (docs/serving.md)."""
