"""magnetar.kernels"""
