"""Running fedmed's coordinator and sites as processes: Flower daemons, certificates."""
