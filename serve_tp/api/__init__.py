"""The HTTP side of a replica: OpenAI routes, validation, tokenizer, streaming.

Runs in the Serve replica's process, which never imports torch (checked by the
import contract in .importlinter).
"""
