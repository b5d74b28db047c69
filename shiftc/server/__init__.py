"""``shiftc serve``: an OpenAI-compatible HTTP server (app.py) over a batching engine (engine.py)
for compiled causal LMs."""
