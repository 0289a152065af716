"""Offline training, evaluation and plots for fer-service, as CLIs (`python -m training.train`)."""
