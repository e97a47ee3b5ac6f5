"""Benchmark client: load generation and reports for any OpenAI-compatible server, over HTTP only
(it imports nothing else from batchlm and never torch)."""
