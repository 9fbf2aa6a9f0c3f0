"""magnetar.runtime"""
