"""Serving generation: sampling, sessions, stage execution with KV caches, batching."""
