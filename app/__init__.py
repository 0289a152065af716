"""The HTTP layer of fer-service: a thin FastAPI app over the `models` inference core."""
