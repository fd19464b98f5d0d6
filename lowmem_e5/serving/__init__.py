"""HTTP: an OpenAI-compatible /v1/embeddings server. `protocol` (request, response and error shapes), `scheduler`
(the one thread that owns the model and batches across requests), `app` (routes, auth, limits, metrics), `server`
(start and stop), `config` (what the server is told at start)."""
