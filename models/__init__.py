"""Inference core of fer-service: network, checkpoint format, preprocessing and predictor.

Nothing in this package knows about HTTP or reads the environment.
"""
