"""`oilleak serve`: the model behind an HTTP API and a page to drop photos on.

- :mod:`.settings`: what the command line sets (limits, pool, batching, API key);
- :mod:`.uploads`: uploaded bytes -> an RGB array, refusing oversize, non-image, corrupt and bomb uploads;
- :mod:`.pool`: the bounded inference pool that batches concurrent requests;
- :mod:`.admission`: the pixel budget in flight and the model passes one request may cost;
- :mod:`.app`: the FastAPI application (endpoints, errors as JSON, access log, API key, admission);
- :mod:`.server`: loads the checkpoint once and runs uvicorn with a graceful SIGTERM;
- ``static/``: the page (plain HTML, CSS and JavaScript, no build step, no CDN).
"""
