"""magnetar.tools"""
