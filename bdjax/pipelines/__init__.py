"""End-to-end pipelines: the glue between configs, data, attacks, training and run folders."""
