"""batchlm.models"""
