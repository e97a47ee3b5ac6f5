"""batchlm.server"""
