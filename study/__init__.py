"""A toy world where identity and prompt adherence can be scored, and the study that measures the papers' claims in it."""
