"""Synthetic multi-site spine CT (`osteo-synth`) and the local federated simulation (`osteo-sim`)."""
