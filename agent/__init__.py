"""magnetar.agent"""
