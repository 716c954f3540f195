"""The hallway: the stage graph and caching, the paper's experiment grid, published numbers, the report."""
