"""Secrets in URLs: redacted wherever xdrec writes or prints, read from the environment at use.

A ``data.remote`` may carry credentials (``https://user:TOKEN@host/x``). xdrec never writes them:
the saved config, the manifest's data config, the W&B config, logs and error lines show
``https://user:***@host/x`` (:func:`redact`). Better, the URL names an environment variable
(``https://user:${SHARDS_TOKEN}@host/x``): the config, every file and the process's own messages
hold the variable's name only; :func:`expand_env` puts its value in when a shard is opened.
"""
from __future__ import annotations

import os
import re

# scheme://user:password@  (the password is whatever runs up to the '@' before the host)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*):(?P<secret>[^/@\s]+)@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:token|access_token|sig|signature|password|secret|key|"
                           r"X-Amz-Signature|X-Amz-Credential|X-Goog-Signature)=)(?P<value>[^&\s'\"]+)", re.IGNORECASE)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class MissingSecret(ValueError):
    """A URL names an environment variable that is not set; the message names it."""


def redact(text: str) -> str:
    """``text`` with every URL password (``user:***@``) and signed-URL token (``?sig=***``) hidden;
    ``${VAR}`` references stay as they are (they hold no secret)."""
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(lambda m: m.group(0) if _ENV.fullmatch(m.group("secret"))
                         else f"{m.group('scheme')}{m.group('user')}:***@", text)
    return _QUERY_SECRET.sub(lambda m: m.group(0) if _ENV.fullmatch(m.group("value")) else f"{m.group('key')}***", text)


def redact_tree(obj):
    """A copy of a dict/list tree (a config as a dict) with every string redacted."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return redact(obj)


def expand_env(url: str, environ=None) -> str:
    """``url`` with each ``${VAR}`` replaced by the variable's value; :class:`MissingSecret` naming
    a variable that is not set. Only at the moment of use: the result is never written or logged."""
    env = os.environ if environ is None else environ

    def value(m: re.Match) -> str:
        if m.group(1) not in env:
            raise MissingSecret(f"data.remote names ${{{m.group(1)}}}, which is not set in the environment")
        return env[m.group(1)]

    return _ENV.sub(value, url)
