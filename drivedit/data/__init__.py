"""Driving data: BDD100K labels, procedural scenes, the latent-encoding job and the latent shards."""
