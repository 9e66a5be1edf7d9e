"""Checkpoints in and out: the catalog of named checkpoints (`catalog`), Hugging Face folders
(`hf_layout`: the tensor plan, `hf_load`, `hf_export`), resumable training state
(`training_state`) and exporting a training checkpoint (`export`)."""
