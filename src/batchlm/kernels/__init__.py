"""batchlm.kernels"""
