"""One hospital's side of a round, with no Flower types: its data, its private training and
validation, and the resend store that keeps a round asked twice from being paid twice. The
ClientApp that calls it is ``fedmed.flower.client_app``."""
