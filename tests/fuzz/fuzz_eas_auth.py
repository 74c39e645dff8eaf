"""Fuzz the EAS request signature and Date checks (gateway/auth.py `verify`).

A request's Authorization, Date, Content-MD5 and Content-Type come from the
client (latin-1 text, as the server hands headers over). Refusal: `verify`
returns the reason for a 401, a str; it must never raise. Invariants: a request
signed by `sign` (as the EAS SDK signs) with the service's token passes, and a
signed request whose body or token differs does not.
"""
import hashlib
import itertools
import sys

import atheris

# email: the standard library's Date parser, instrumented so that the fuzzer learns its forms.
with atheris.instrument_imports(include=["gateway", "email"]):
    from gateway import auth

COVERS = ("gateway/auth.py",)
NOW = 1_780_000_000.0
UNIQUE = itertools.count()  # each signed body once: a repeat after 2 s is refused on purpose


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    token = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(1, 24)) or "t"
    service = fdp.ConsumeUnicodeNoSurrogates(12)
    path = f"/api/predict/{service}"
    body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))

    def text(limit: int) -> str:  # a header value, as the server hands it over
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, limit)).decode("latin-1")

    # Mostly the signed form with the body's own MD5, so that the Date parser is reached.
    headers = {"authorization": ("EAS " if fdp.ConsumeProbability() < 0.9 else "") + text(40),
               "date": text(48), "content-type": text(24)}
    if fdp.ConsumeProbability() < 0.8:
        headers["content-md5"] = hashlib.md5(body).hexdigest()
    elif fdp.ConsumeBool():
        headers["content-md5"] = text(40)
    now = NOW + fdp.ConsumeIntInRange(-20 * 3600, 20 * 3600)
    reason = auth.verify(headers, "POST", path, body, token, service, now=now)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        assert headers.get("authorization"), "passed without a token"

    unique_body = body + b"#%d" % next(UNIQUE)
    signed = {k.lower(): v for k, v in auth.sign(token, unique_body, service, now=now).items()}
    assert auth.verify(signed, "POST", path, unique_body, token, service, now=now) is None
    assert auth.verify(signed, "POST", path, unique_body + b"!", token, service, now=now)
    assert auth.verify(signed, "POST", path, unique_body, token + "x", service, now=now)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
