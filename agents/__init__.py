"""Agent Service: the episode state machine, prompts and action parsing (queue ``agent``, CPU)."""
