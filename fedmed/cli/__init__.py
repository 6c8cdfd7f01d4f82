"""fedmed's command-line tools."""
