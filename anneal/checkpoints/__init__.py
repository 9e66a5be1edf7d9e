"""Checkpoints in and out: a run's resumable checkpoints (`run_checkpoints`, the one owner; the
on-disk names in `discovery`, one step folder in `training_state`), the catalog of named
checkpoints (`catalog`), Hugging Face folders (`hf_layout`: the tensor plan, `hf_load`,
`hf_export`) and exporting a training checkpoint (`export`, `sharded_export`)."""
