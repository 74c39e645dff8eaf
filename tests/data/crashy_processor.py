"""A custom (python) processor that works, then takes its worker down.

initialize() arms a timer: CRASH_AFTER_S seconds later the whole worker process
exits with code 3 -- long enough for it to answer /health first, as a worker
with a slow memory leak or a bad background thread would. Tests use it to see
that the launcher does not restart such a worker forever.
"""
import os
import sys
import threading

CRASH_AFTER_S = 1.5


class CrashyProcessor:
    def initialize(self):
        def crash():
            print("crashy processor: giving up now", flush=True)
            sys.stdout.flush()
            os._exit(3)

        timer = threading.Timer(CRASH_AFTER_S, crash)
        timer.daemon = True
        timer.start()

    def process(self, data):
        return b"ok:" + data, 200
