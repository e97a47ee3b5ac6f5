"""batchlm.runner"""
