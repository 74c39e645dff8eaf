"""A custom (python) processor for tests: its behaviour is chosen by the request body.

b"sleep:<seconds>" sleeps then answers; b"status:<code>" answers that code;
anything else is echoed back with the worker's port, so tests see who answered.
"""
import os
import time


class EchoProcessor:
    def initialize(self):
        self.port = os.environ.get("ECHO_PORT", "?")

    def process(self, data):
        if data.startswith(b"sleep:"):
            time.sleep(float(data[6:]))
            return b"slept " + self.port.encode(), 200
        if data.startswith(b"status:"):
            return b"as asked", int(data[7:])
        return self.port.encode() + b":" + data, 200
