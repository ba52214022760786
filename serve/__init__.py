"""Serving: Ray Serve deployments behind an OpenAI-compatible API (in progress)."""
