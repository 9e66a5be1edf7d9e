"""Benchmark evals: task files (`tasks`), forward-only scoring in the training loop (`scoring`,
`callback`), the training-mixture overlap check (`overlap`), and generative evals of exports
through lm-evaluation-harness (`harness`, the `anneal-eval` command)."""
