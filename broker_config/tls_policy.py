"""The TLS policy of every device listener, on every broker (one definition, two users:
the Mosquitto renderer and the embedded broker's ``ssl`` contexts).

* TLS 1.2 is the minimum; TLS 1.3 is preferred (OpenSSL picks the highest version both
  sides offer, and both brokers offer 1.3).
* TLS 1.2 suites: ECDHE key exchange (forward secrecy) with an AEAD cipher only — no CBC
  (Lucky-13 style padding oracles, and SHA-1 MACs on Mosquitto's defaults), no RSA key
  transport, no static DH.
* TLS 1.3 suites: the three AEAD suites OpenSSL enables by default (AES-GCM and
  ChaCha20-Poly1305), named explicitly so a changed library default cannot widen them.
* No session resumption (see docs/broker.md, "TLS policy"): a resumed session skips
  certificate verification, so a device revoked after its first handshake could come back
  on its old session without meeting the new CRL.
"""

from __future__ import annotations

__all__ = ["MIN_TLS_VERSION", "TLS12_CIPHERS", "TLS13_CIPHERSUITES"]

#: Mosquitto's ``tls_version`` value: the minimum version in Mosquitto 2.0.
MIN_TLS_VERSION = "tlsv1.2"

#: OpenSSL cipher list for TLS 1.2 (``ciphers`` / ``SSLContext.set_ciphers``).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

#: OpenSSL ciphersuites for TLS 1.3 (``ciphers_tls1.3``). Python's ``ssl`` cannot set
#: these; its contexts use OpenSSL's default, which is exactly this list.
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
