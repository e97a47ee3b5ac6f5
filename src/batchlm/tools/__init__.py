"""Tool calling, apart from HTTP: validation of a request's `tools`/`tool_choice`, the constraint a forced
call is decoded under, tool prompting, and the per-family parsers that turn a model's call markup into
calls (whole or streamed). The server shapes these calls into OpenAI's `tool_calls`."""
