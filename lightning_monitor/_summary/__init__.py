"""RunSummary's numbers and their renderings (terminal table, Markdown card)."""
