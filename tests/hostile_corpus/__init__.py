"""The hostile corpus of issue #15: case builders by class and the one checker (run by tests/test_hostile_corpus.py)."""
