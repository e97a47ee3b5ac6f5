"""Structured outputs: grammars that constrain a completion token by token (torch-free)."""
