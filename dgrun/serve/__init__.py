"""`dgrun serve`: a recipe as a warm image server (FastAPI on uvicorn; Ray Serve with `--ray`).

Needs the `serve` extra (`pip install 'dgrun[serve]'`): fastapi, uvicorn, prometheus-client.
"""
