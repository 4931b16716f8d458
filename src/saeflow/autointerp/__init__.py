"""LLM auto-interpretation of SAE latents (Figure 8 of the Dark Matter paper).

``client`` (async OpenAI-compatible chat completions with retries and an answer cache),
``server`` (a local ``transformers serve`` that is always stopped), ``prompts`` (every prompt),
``scoring`` (answer parsing and per-decile recall math) and ``score`` (the stage CLI). The
latent-example file the stage reads is written by ``examples``.
"""
