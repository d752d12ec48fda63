"""The conversation: the chat session and REPL, prompt rendering, the sandboxed chat template."""
