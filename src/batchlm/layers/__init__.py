"""batchlm.layers"""
