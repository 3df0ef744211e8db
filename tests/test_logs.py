"""covalent_lot._logs: secrets the SDKs log at DEBUG are redacted."""

from __future__ import annotations

import logging

import pytest

from covalent_lot._logs import redact_sdk_logs

TOKEN = "FQoGZXIvYXdzEXAMPLEsessiontoken/with+base64=="
SIG = "s3cr3tSig%2Bvalue%3D"


@pytest.mark.parametrize("logger, message, args", [
    ("botocore.auth", "CanonicalRequest:\nPUT\n/b/k\n\nhost:h\nx-amz-security-token:%s\n", (TOKEN,)),
    ("botocore.endpoint", "Sending http request: <AWSPreparedRequest headers={%s}>",
     (f"'X-Amz-Security-Token': b'{TOKEN}', 'User-Agent': b'x'",)),
    ("urllib3.connectionpool", '%s "%s %s HTTP/1.1" %s',
     ("http://127.0.0.1:1", "PUT", f"/acct/c/b?se=2030&sp=rw&sig={SIG}&comp=block", 201)),
])
def test_secrets_in_sdk_debug_records_are_redacted(caplog, logger, message, args):
    redact_sdk_logs()
    redact_sdk_logs()  # idempotent: one filter
    assert len(logging.getLogger(logger).filters) == 1
    with caplog.at_level(logging.DEBUG, logger=logger):
        logging.getLogger(logger).debug(message, *args)
    text = caplog.records[-1].getMessage()
    assert TOKEN not in text and SIG not in text
    assert "REDACTED" in text
    assert "comp=block" in text or "User-Agent" in text or "host:h" in text  # the rest stays
