"""Differential privacy at the site: clipping, accounting, ledger and budget."""
