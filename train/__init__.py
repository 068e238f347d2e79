"""Train Nested Attention adapters: `python -m train --config my_run.toml` from the pack's folder (docs/training.md)."""
