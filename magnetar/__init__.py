"""Magnetar: a local coding agent for DeepSeek V4 Flash.

The code lives in the top-level folders agent/, runtime/, tools/, kernels/ and
prompts/, installed as magnetar.agent, magnetar.runtime and so on.
"""

__version__ = "0.1.0"
