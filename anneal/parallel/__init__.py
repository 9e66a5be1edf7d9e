"""Processes and ranks: the parallel layout (`layout`), the engine seam (`engine_protocol`), the one
place that parallelizes the model (`parallelize`), and the DeepSpeed engine (`ds_engine`, its config
`ds_config`, and `deepspeed_compat`, the adapter that alone touches DeepSpeed's internals)."""
