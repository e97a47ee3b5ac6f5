"""batchlm.engine"""
