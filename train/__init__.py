"""xdrec training side: config, data, engine, stages, loop, evaluation, tracking, CLI."""
