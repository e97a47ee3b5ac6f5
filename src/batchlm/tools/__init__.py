"""Tool calling: validation of `tools`/`tool_choice`, the constraint a forced call is decoded under, and
the per-family parsers that turn a model's call markup into OpenAI `tool_calls` (whole or streamed)."""
