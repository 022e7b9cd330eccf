"""Training: the loop, the typed checkpoint it writes, and what it needs to run on several processes."""
