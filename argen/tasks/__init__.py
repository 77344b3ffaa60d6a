"""Model families as Tasks for the shared training loop: what to build, what loss to step, what to evaluate and save."""
