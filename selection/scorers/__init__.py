"""Window scorers behind one registry (`selection.method` picks one by name)."""
