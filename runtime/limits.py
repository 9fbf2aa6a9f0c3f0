"""Context sizes every front end shares, in a module that imports nothing, so the CLI
can state them in its help without loading MLX and the model code."""

# The context of every command that loads a model to use it (TUI, generate, run, review):
# room for a long coding session. It costs nothing until used: the KV state grows with the
# tokens it holds, not with the context (runtime/kv_state.py).
DEFAULT_CTX = 65536
MAX_CTX = 1_048_576  # V4's trained context (1M tokens)
