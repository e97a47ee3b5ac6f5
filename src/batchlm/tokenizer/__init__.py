"""Tokenization: the tokenizer wrapper, chat templates, incremental detokenizer and offline BPE builder."""
