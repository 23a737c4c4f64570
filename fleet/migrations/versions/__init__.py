"""The revisions, oldest first: ``v0001`` is schema version 1 (the first release of the store)."""
