"""batchlm.backends"""
