"""Command-line entry points of osteo_model (Hydra-composed)."""
