"""magnetar.prompts"""
