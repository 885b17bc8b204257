"""An OpenAI-compatible gateway."""
