"""magnetar.runtime.lab: building and measuring models, beside the inference core.

The converter, the test-model maker and its GGUF writer, the importance matrix,
quality and speed measurements, and their CLI commands. They use the core
(``magnetar.runtime``'s modules); the core never imports anything from here.
"""
