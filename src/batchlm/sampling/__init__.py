"""batchlm.sampling"""
