"""Chaos suite: replicas under kill -9, SIGTERM, a database restart and malformed rows.

``harness`` drives the run on a private PostgreSQL cluster, ``checker`` proves the SPEC's
invariants from the tables alone, ``test_chaos`` is the short version in the normal suite and
``python -m tests.chaos --minutes 5`` the long one.
"""
