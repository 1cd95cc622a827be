"""Actors, transport and scheduling: the machinery behind the public API."""
