"""batchlm.parallel"""
