"""The hook contract: the four hookspecs, and the contexts and results they pass."""
