"""batchlm.tokenizer"""
