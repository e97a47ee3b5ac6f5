"""batchlm.bench"""
