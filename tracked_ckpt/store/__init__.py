"""The storage seam and everything that talks to the tracking server: the run store (run_store.py), parallel
transfers (transfer.py), HTTP time budgets (http.py), the read-only client (reading.py) and the run lease (lease.py).
"""
