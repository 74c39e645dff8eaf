"""A python processor that answers without running a model: bench/gpu.py measures the
load generator's own ceiling against it."""


class NullProcessor:
    def process(self, data):
        return b"", 200
