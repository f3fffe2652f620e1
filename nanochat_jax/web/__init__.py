"""The web server: the Flask app (app.py) with nanochat's protocol and an OpenAI-compatible API,
request validation (validation.py), metrics (metrics.py), waitress (server.py) and the chat page
(static/index.html)."""
