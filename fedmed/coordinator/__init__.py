"""The coordinator's side of a federated run, with no Flower types: checking what sites send,
aggregating it, recording rounds, the starting model and the final model's card. The round
loop that drives these over Flower's Grid is ``fedmed.flower.coordinator``."""
