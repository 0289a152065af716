"""The `fer` command: local prediction, export, and the training and serving CLIs under one name."""
