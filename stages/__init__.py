"""rac: reasoning-aware compression of reasoning LLMs, as a DVC pipeline."""
