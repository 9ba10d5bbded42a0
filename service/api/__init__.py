"""HTTP routes: each handler parses, calls the engine, and shapes the answer."""
