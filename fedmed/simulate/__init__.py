"""Local multi-site simulation: `fedmed-simulate`."""
