"""Training engine building blocks: crash-safe checkpoints (:mod:`kdscale.engine.checkpoint`) and
RNG seeding / state capture (:mod:`kdscale.engine.rng`)."""
