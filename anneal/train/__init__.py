"""Training: schedule and batch ramp, start LR, the engines, the loop and its callbacks,
tracking and plots."""
