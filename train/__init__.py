"""Training, data preparation, export and evaluation for ConsistentID (``docs/TRAINING.md``).

CLIs: ``python -m train.prepare``, ``python -m train.fit``, ``python -m train.export``,
``python -m train.evaluate`` (and ``python -m train.synthetic`` for a smoke-test data set).
"""
