"""The model: its config (`config`: the HF dots1 fields, FLOP counts), the dots1 network
(`dots1`) and the mixed-precision policy (`precision`)."""
