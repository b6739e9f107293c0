"""Job entry points: ``python -m jobs.<name>`` locally or as a ``ray job submit`` entrypoint."""
