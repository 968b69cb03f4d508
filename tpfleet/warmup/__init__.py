"""Warm-up caches that can be trusted: build JIT artifacts once, and know when they are still valid."""
