"""Processes and ranks: the parallel layout (`layout`) and the DeepSpeed engine (`ds_engine`)."""
