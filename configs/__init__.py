"""Hydra config groups (data only); composed by `osteo_model.config.compose`."""
