"""Keep credentials out of logs and MLflow: S3 keys, passwords and tokens become '***'.

A secret is recognised three ways:
  - by name: an environment variable or parameter key with a component that names a
    secret (`AWS_SECRET_ACCESS_KEY`, `AWS_ACCESS_KEY_ID`, `HF_TOKEN`,
    `remote.storage.secret_access_key`); components are split on `_` and `.`, so
    `max_new_tokens` or `TOKENIZERS_PARALLELISM` are not secrets;
  - by value: any text containing the value of such an environment variable (an S3
    key quoted in an error message from boto3 or DVC);
  - in URLs: the `user:password@` part (`http://user:pw@host` -> `http://***@host`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter values ("1", "on") would mask ordinary text
SECRET_NAME = re.compile(
    r"(?:^|[._])(?:secret|password|passwd|token|access_key|access_key_id|api_key|"
    r"session_token|credentials?)(?:$|[._])",
    re.IGNORECASE,
)
URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@", re.I)


def is_secret_name(name: str) -> bool:
    """True for names like `AWS_SECRET_ACCESS_KEY` or `remote.s3.access_key_id`."""
    return bool(SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """Values of the secret-named variables in `environ`, longest first."""
    values = {
        value
        for name, value in environ.items()
        if is_secret_name(name) and len(value) >= MIN_SECRET_CHARS
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value and every URL password replaced by `MASK`."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return URL_USERINFO.sub(rf"\g<scheme>{MASK}@", text)


def redact_mapping(values: Mapping[str, str], secrets: Iterable[str]) -> dict[str, str]:
    """Params or tags for MLflow: secret-named keys masked, secrets in values masked."""
    secrets = list(secrets)
    return {
        key: MASK if is_secret_name(key) else redact(value, secrets)
        for key, value in values.items()
    }


def install_log_redaction() -> None:
    """From now on every log record (any logger, Prefect's included) is redacted when made.

    The message is formatted once, redacted against the environment's secrets at that
    moment, and stored back without args; a traceback is formatted and redacted too.
    Installing twice is harmless.
    """
    base = logging.getLogRecordFactory()
    if getattr(base, "redacting", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = base(*args, **kwargs)
        secrets = secret_values(os.environ)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's to report
            return record
        cleaned = redact(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), secrets)
        return record

    factory.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
