"""microvm-run: start an AI coding agent in a throw-away microVM."""
