"""Weight sync from learners to generation engines: bucketed payloads (buckets.py) and their transports.

Submodules are imported explicitly; importing this package pulls in no transport.
"""
