"""Coordinating-site side of the federation: ServerApp, strategy, checkpoints, provisioning, `flower-server`."""
