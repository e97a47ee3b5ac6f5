"""batchlm.attention"""
