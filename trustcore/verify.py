"""Certificate chain verification with precise refusal reasons.

``cryptography.x509.verification`` builds the path and checks signatures, validity of every
certificate, CA constraints and name chaining. It does no revocation checking and reports
failures as free text. So :class:`ChainVerifier` runs, in this fixed order:

1. leaf pre-checks (:func:`trustcore.verify_leaf.check_leaf`), each with its own reason:
   ``wrong_key_type`` (only P-256), ``ca_leaf`` (basicConstraints CA:TRUE or keyCertSign on
   an end entity), ``not_yet_valid``, ``expired``, ``wrong_eku`` (required EKU absent;
   anyExtendedKeyUsage does not count), ``wrong_key_usage``, ``missing_san`` (client/server
   certificates), ``malformed`` (a device identity whose CN, serialNumber and
   hardwareModuleName disagree), ``untrusted`` (self-signed leaf);
2. the library's path building, errors mapped to ``path_length``, ``expired``,
   ``not_yet_valid`` (for an intermediate) or ``untrusted`` (unknown / wrong issuer, bad
   signature);
3. revocation of every certificate below the trust anchor against a verified CRL of its
   issuer: ``revoked``, ``crl_missing`` (fail closed when CRLs are required), ``crl_stale``.
   A certificate listed in a held indirect CRL (the HQ CRL signer's, docs/pki.md) is
   ``revoked`` whatever else holds. A certificate whose CRLDistributionPoints names a
   cRLIssuer for which an indirect CRL is held is checked against that CRL instead of its
   issuer's: it must be fresh, and the issuer's own CRL, when present, only adds
   revocations (its staleness is ignored: a station switched off years ago signs no new
   CRL).

The first failing check decides the reason, so a certificate that is both expired and
revoked is reported ``expired``. Construct a :class:`ChainVerifier` once (it parses the store
and verifies each CRL's signature once) and call :meth:`ChainVerifier.verify` per client.

Verified CA paths are remembered (per verifier, so new CRLs or roots start afresh): once a
client's issuing CA has been part of a chain that passed every check, the next chain that
brings the same intermediates is path-built by the library with that CA as its only anchor
(the leaf's signature, validity and the library's end-entity checks, every time) and the
CA's already verified path above it is re-checked for validity at ``now``; step 1 and the
revocation of EVERY certificate of the chain (step 3) run for every request as before.
Anything unusual (an out-of-validity CA, a failed anchored check, name constraints) takes
the full path, which also gives the precise reason. This saves the CA's own signature check
and path building per client: a site verifies thousands of devices of a few stations.

The anchored library verifier of a remembered path is built for one validation time and
reused for requests within ``_VERIFIER_REUSE`` of it (building one costs more than the
leaf's signature check). This is exact, not a tolerance: the only checks of that verifier
that depend on the time are the validity windows of the leaf and of the anchoring CA, and
both are checked at the request's own ``now`` before it runs (the leaf by ``check_leaf``,
the CA path by ``_known_path``, RFC 5280 bounds, both inclusive). A verifier built at an
earlier instant can only refuse more (a leaf not yet valid back then): such a refusal is
retried with a verifier built at ``now``, so the answer is the one of a fresh verifier.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as libverify
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, ObjectIdentifier

from trustcore.crl import (
    IndirectRevocationSet,
    RevocationSet,
    crl_authority_key_id,
    verify_crl,
    verify_indirect_crl,
)
from trustcore.der import der_oid_body, tbs_names_der, tbs_parts_der
from trustcore.errors import X509_PARSE_ERRORS, CrlError, EncodingError, VerificationError
from trustcore.identity import DeviceId
from trustcore.profiles import OID_EKU_CRL_SIGNER, crl_issuers_of
from trustcore.utctime import aware_utc
from trustcore.verify_leaf import SAN_REQUIRED_FOR, check_leaf, load_certificate

__all__ = ["ChainVerifier", "VerifiedIdentity", "load_certificate", "verify_client_chain"]

#: Root -> station/site CA -> leaf is depth 2; one spare level makes the library report a
#: too-deep chain as a pathLen violation (which we check) rather than a depth limit.
_MAX_CHAIN_DEPTH = 4
#: Verified CA paths remembered per verifier (one per distinct set of intermediates a
#: client brought; a site sees a handful of station CAs). Full: the oldest is forgotten.
_MAX_REMEMBERED_PATHS = 64
#: An anchored library verifier is reused for validation times this close to the one it
#: was built for (see the module docstring: the answer does not depend on it).
_VERIFIER_REUSE = timedelta(seconds=60)
#: The CRLDistributionPoints OID as a TBS carries it (see ``tbs_parts_der``).
_CRLDP = der_oid_body(ExtensionOID.CRL_DISTRIBUTION_POINTS)


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """Who presented a chain that verified. ``chain`` runs leaf first, trust anchor last."""

    device_id: DeviceId | None
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    issuer: x509.Certificate
    #: The leaf's public key as parsed for the checks (always ECDSA P-256 when verified).
    leaf_key: ec.EllipticCurvePublicKey | None = None

    @property
    def subject(self) -> x509.Name:
        return self.leaf.subject

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]


#: A naive or missing verification time is a malformed request to the verifier.
_BAD_TIME = functools.partial(VerificationError, reason="malformed")


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except X509_PARSE_ERRORS as exc:  # duplicate or unparsable extension
        raise VerificationError(
            f"certificate extensions are malformed: {exc}", reason="malformed"
        ) from exc


def _key_id(cert: x509.Certificate) -> bytes:
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    if isinstance(ski, x509.SubjectKeyIdentifier):
        return ski.digest
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return x509.SubjectKeyIdentifier.from_public_key(key).digest


class _Anchored:
    """``built``: (validation time, the library verifier built from a :class:`_KnownPath`'s
    policy for it), reused near that time (see the module docstring); replaced whole."""

    __slots__ = ("built",)

    def __init__(self) -> None:
        self.built: tuple[datetime, libverify.ClientVerifier] | None = None


@dataclass(frozen=True, slots=True)
class _KnownPath:
    """A CA path that verified (issuing CA first, trust anchor last) and the library's
    policy (all but the time) with only its issuing CA as the anchor."""

    tail: tuple[x509.Certificate, ...]
    policy: libverify.PolicyBuilder
    #: The issuing CA's subject as encoded in its certificate (see ``tbs_names_der``).
    issuer_subject: bytes
    anchored: _Anchored


def _names_der(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """(issuer, subject) DER as the certificate carries them; for a TBS the short reader
    does not follow, the library's re-encoding."""
    try:
        return tbs_names_der(cert)
    except EncodingError:
        return cert.issuer.public_bytes(), cert.subject.public_bytes()


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


class ChainVerifier:
    """Verifies many end-entity chains against fixed roots, intermediates and CRLs.

    ``crls`` are verified once (issuer, signature): here when their CA is among ``roots`` and
    ``intermediates`` (a bad one raises ``CrlError``), otherwise the first time their CA is
    part of a verified chain (a bad one is then ignored, so ``crl_missing`` follows). Their
    freshness is checked at each :meth:`verify` because it depends on ``now``.
    """

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        crls: Iterable[x509.CertificateRevocationList] = (),
        *,
        required_eku: ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        require_crl: bool = True,
        require_san: bool | None = None,
        indirect_crls: Iterable[tuple[x509.CertificateRevocationList, x509.Certificate]] = (),
    ) -> None:
        if not roots:
            raise VerificationError("no trust anchors given", reason="untrusted")
        self._roots = tuple(roots)
        self._intermediates = tuple(intermediates)
        self._store = libverify.Store(list(self._roots))
        self._required_eku = required_eku
        self._require_crl = require_crl
        self._require_san = required_eku in SAN_REQUIRED_FOR if require_san is None else require_san
        self._root_ids = {(r.subject.public_bytes(), _key_id(r)) for r in self._roots}
        # End-entity checks are ours (done before the library, with precise reasons), so the
        # library's EE policy is permit_all; the CA policy stays the Web PKI default.
        self._ee_policy = libverify.ExtensionPolicy.permit_all()
        self._ca_policy = libverify.ExtensionPolicy.webpki_defaults_ca()
        self._crls: dict[tuple[bytes, bytes], RevocationSet] = {}
        # CRLs of CAs not known yet (e.g. a station CA the client will send): verified against
        # that CA only once the CA itself is part of a chain that verified to a root.
        self._pending: dict[bytes, list[x509.CertificateRevocationList]] = {}
        cas = self._roots + self._intermediates
        for crl in crls:
            issuer = self._crl_issuer(crl, cas)
            if issuer is None:
                self._pending.setdefault(crl.issuer.public_bytes(), []).append(crl)
            else:
                self._add(verify_crl(crl, issuer, now=None), issuer)
        self._indirect: dict[bytes, IndirectRevocationSet] = {}
        for crl, signer in indirect_crls:
            self._add_indirect(crl, signer)
        #: presented intermediates -> the issuing CA's verified path up to the anchor and the
        #: library policy anchored at that CA. Filled only by chains that passed every check.
        self._paths: dict[tuple[x509.Certificate, ...], _KnownPath] = {}
        #: DER -> parsed certificate, for the intermediates of remembered paths only.
        self._parsed: dict[bytes, x509.Certificate] = {}
        # Keyed by id() (hashing a certificate hashes its DER, at every request) with the
        # certificate kept beside the value: it stays alive, so its id names no other
        # object, and a hit is checked with ``is``. An equal certificate that is another
        # object is a miss (computed again: the same value).
        #: A leaf's CRLDistributionPoints extnValue -> its encoded cRLIssuer names (a pure
        #: function of those bytes; all devices of a station carry the same), see
        #: :meth:`_leaf_crl_issuers`.
        self._leaf_crldp_issuers: dict[bytes, tuple[bytes, ...]] = {}
        #: id(CA certificate) -> (it, (subject DER, key id)), see :meth:`_ca_id`.
        self._ca_ids: dict[int, tuple[x509.Certificate, tuple[bytes, bytes]]] = {}
        #: id(CA certificate) -> (it, its encoded cRLIssuer names), see
        #: :meth:`_crl_issuer_ders`.
        self._crl_issuers: dict[int, tuple[x509.Certificate, tuple[bytes, ...]]] = {}

    def _add_indirect(self, crl: x509.CertificateRevocationList, signer: x509.Certificate) -> None:
        """Accept an indirect CRL whose signer is a CRL-signer role certificate under one of
        the roots, valid when it signed, and not on a root CRL held (fail closed: CrlError)."""
        revocations = verify_indirect_crl(crl, signer, now=None)
        try:
            identity = ChainVerifier(
                self._roots, required_eku=OID_EKU_CRL_SIGNER, require_crl=False
            ).verify(signer, now=revocations.this_update)
        except VerificationError as exc:
            raise CrlError(
                f"indirect CRL signer is not trusted: {exc.message}", reason="crl_wrong_issuer"
            ) from exc
        root_crl = self._crls.get((identity.root.subject.public_bytes(), _key_id(identity.root)))
        if root_crl is not None and signer.serial_number in root_crl:
            raise CrlError(
                "the indirect CRL signer is revoked by the root", reason="crl_wrong_issuer"
            )
        key = crl.issuer.public_bytes()
        current = self._indirect.get(key)
        if current is None or revocations.crl_number > current.crl_number:
            self._indirect[key] = revocations

    def _add(self, revocations: RevocationSet, issuer: x509.Certificate) -> None:
        key = (issuer.subject.public_bytes(), revocations.issuer_key_id)
        current = self._crls.get(key)
        if current is None or revocations.crl_number > current.crl_number:
            self._crls[key] = revocations

    @staticmethod
    def _crl_issuer(
        crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]
    ) -> x509.Certificate | None:
        candidates = [ca for ca in cas if ca.subject == crl.issuer]
        aki = crl_authority_key_id(crl)
        if aki is not None:
            candidates = [ca for ca in candidates if _key_id(ca) == aki]
        return candidates[0] if candidates else None

    def _ca_id(self, ca: x509.Certificate) -> tuple[bytes, bytes]:
        """(subject DER, key id) of a CA on a verified chain: how its CRLs are found. A pure
        function of the certificate, kept for the CAs this verifier sees (a few)."""
        held = self._ca_ids.get(id(ca))
        if held is not None and held[0] is ca:
            return held[1]
        known = (ca.subject.public_bytes(), _key_id(ca))
        if len(self._ca_ids) < _MAX_REMEMBERED_PATHS * 4:
            self._ca_ids[id(ca)] = (ca, known)
        return known

    def _crl_issuer_ders(self, cert: x509.Certificate, *, cached: bool) -> tuple[bytes, ...]:
        """The encoded cRLIssuer names of ``cert``'s CRL distribution points; kept for the
        CAs on verified chains (``cached``: a few, asked at every verification)."""
        if cached and (held := self._crl_issuers.get(id(cert))) is not None and held[0] is cert:
            return held[1]
        ders = tuple(name.public_bytes() for name in crl_issuers_of(cert))
        if cached and len(self._crl_issuers) < _MAX_REMEMBERED_PATHS * 4:
            self._crl_issuers[id(cert)] = (cert, ders)
        return ders

    def _leaf_crl_issuers(self, leaf: x509.Certificate, crldp: bytes | None) -> tuple[bytes, ...]:
        """The encoded cRLIssuer names of ``leaf``'s CRL distribution points. ``crldp``: its
        CRLDistributionPoints extnValue as carried (b"": it has none; None: not read)."""
        if crldp == b"":
            return ()
        known = None if crldp is None else self._leaf_crldp_issuers.get(crldp)
        if known is None:
            known = tuple(name.public_bytes() for name in crl_issuers_of(leaf))
            if crldp is not None and len(self._leaf_crldp_issuers) < _MAX_REMEMBERED_PATHS * 4:
                self._leaf_crldp_issuers[crldp] = known
        return known

    def _revocations_for(self, issuer: x509.Certificate) -> RevocationSet | None:
        key = self._ca_id(issuer)
        pending = self._pending.get(key[0])
        if pending:
            for crl in list(pending):
                if self._crl_issuer(crl, [issuer]) is None:
                    continue  # same name, another key: not this CA's CRL
                pending.remove(crl)
                try:
                    self._add(verify_crl(crl, issuer, now=None), issuer)
                except CrlError:
                    continue  # a CRL that does not verify is no CRL: crl_missing follows
        return self._crls.get(key)

    # ------------------------------------------------------------------ the checks

    def verify(
        self,
        leaf: x509.Certificate | bytes,
        *,
        now: datetime,
        intermediates: Sequence[x509.Certificate] = (),
        require_device_id: bool = False,
    ) -> VerifiedIdentity:
        """Verify ``leaf`` (plus any ``intermediates`` it brought) at time ``now``."""
        moment = aware_utc("verification time", now, _BAD_TIME)
        if not isinstance(leaf, x509.Certificate):
            leaf = load_certificate(leaf)
        presented = tuple(intermediates)
        try:
            try:  # one read of the TBS: names, and what the revocation check needs
                issuer_der, subject_der, extensions = tbs_parts_der(leaf)
                names = (issuer_der, subject_der)
                crldp: bytes | None = extensions.get(_CRLDP, b"")
            except EncodingError:
                names, crldp = _names_der(leaf), None
            device_id, leaf_key = check_leaf(
                leaf,
                names,
                moment,
                required_eku=self._required_eku,
                require_san=self._require_san,
                require_device_id=require_device_id,
            )
            chain = self._known_path(leaf, names[0], presented, moment)
            if chain is None:
                untrusted = list(self._intermediates) + list(presented)
                chain = self._build_path(leaf, untrusted, moment)
                self._check_revocation(chain, moment, self._leaf_crl_issuers(leaf, crldp))
                self._remember(presented, chain)
            else:
                self._check_revocation(chain, moment, self._leaf_crl_issuers(leaf, crldp))
        except X509_PARSE_ERRORS as exc:
            # cryptography parses some fields (names, keys, extensions) lazily, on first
            # access: a mangled certificate can fail deep inside any check.
            raise VerificationError(
                f"certificate does not parse: {exc}", reason="malformed"
            ) from exc
        return VerifiedIdentity(
            device_id=device_id,
            leaf=leaf,
            chain=chain,
            issuer=chain[1],
            leaf_key=leaf_key,
        )

    @property
    def remembered_paths(self) -> int:
        """How many verified CA paths this verifier remembers (see the module docstring)."""
        return len(self._paths)

    def load_intermediates(self, ders: Sequence[bytes]) -> tuple[x509.Certificate, ...]:
        """Parse the intermediates a client brought (``x509.load_der_x509_certificate``
        errors propagate); those of a remembered verified path are not parsed again."""
        parsed = self._parsed
        return tuple(parsed.get(der) or x509.load_der_x509_certificate(der) for der in ders)

    def _known_path(
        self,
        leaf: x509.Certificate,
        issuer_der: bytes,
        presented: tuple[x509.Certificate, ...],
        now: datetime,
    ) -> tuple[x509.Certificate, ...] | None:
        """The chain through a remembered, already verified CA path, or None (full path).
        ``issuer_der``: the leaf's issuer as encoded (``_names_der``)."""
        known = self._paths.get(presented)
        if known is None or issuer_der != known.issuer_subject:
            return None  # (a name encoded otherwise takes the full path: still correct)
        if any(not c.not_valid_before_utc <= now <= c.not_valid_after_utc for c in known.tail):
            return None  # the full path says which one and why
        built = known.anchored.built
        if built is None or abs(now - built[0]) > _VERIFIER_REUSE:
            built = (now, known.policy.time(now).build_client_verifier())
            known.anchored.built = built
        try:
            verified = built[1].verify(leaf, [])
        except libverify.VerificationError:
            if built[0] == now:
                return None
            try:  # built for another instant: the answer at ``now`` is a fresh verifier's
                verified = known.policy.time(now).build_client_verifier().verify(leaf, [])
            except libverify.VerificationError:
                return None
        if len(verified.chain) != 2 or verified.chain[1] != known.tail[0]:
            return None
        return (leaf, *known.tail)

    def _remember(
        self, presented: tuple[x509.Certificate, ...], chain: tuple[x509.Certificate, ...]
    ) -> None:
        """Remember the verified path above ``chain``'s leaf, unless a certificate on it
        carries name constraints (they constrain each leaf: the library checks them)."""
        tail = chain[1:]
        if presented in self._paths or any(_ext(c, x509.NameConstraints) is not None for c in tail):
            return
        if len(self._paths) >= _MAX_REMEMBERED_PATHS:
            oldest = next(iter(self._paths))
            del self._paths[oldest]
            for cert in oldest:
                self._parsed.pop(cert.public_bytes(serialization.Encoding.DER), None)
        policy = (
            libverify.PolicyBuilder()
            .store(libverify.Store([tail[0]]))
            .max_chain_depth(_MAX_CHAIN_DEPTH)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
        )
        self._paths[presented] = _KnownPath(tail, policy, _names_der(tail[0])[1], _Anchored())
        for cert in presented:
            self._parsed[cert.public_bytes(serialization.Encoding.DER)] = cert

    def _build_path(
        self, leaf: x509.Certificate, untrusted: list[x509.Certificate], now: datetime
    ) -> tuple[x509.Certificate, ...]:
        verifier = (
            libverify.PolicyBuilder()
            .store(self._store)
            .time(now)
            .max_chain_depth(_MAX_CHAIN_DEPTH)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, untrusted)
        except libverify.VerificationError as exc:
            reason = self._diagnose(leaf, untrusted, now)
            raise VerificationError(f"no trusted path: {exc}", reason=reason) from exc
        return tuple(verified.chain)

    def _diagnose(
        self, leaf: x509.Certificate, untrusted: list[x509.Certificate], now: datetime
    ) -> str:
        """Explain a library refusal: walk issuers by name (and key id) from the leaf and
        report the first intermediate that is out of its validity or breaks a pathLen."""
        pool = list(self._roots) + untrusted
        chain = [leaf]
        current = leaf
        for _ in range(_MAX_CHAIN_DEPTH + 2):
            aki = _ext(current, x509.AuthorityKeyIdentifier)
            wanted = aki.key_identifier if isinstance(aki, x509.AuthorityKeyIdentifier) else None
            parents = [
                c
                for c in pool
                if c.subject == current.issuer
                and c is not current
                and (wanted is None or _key_id(c) == wanted)
            ]
            if not parents:
                return "untrusted"
            current = parents[0]
            chain.append(current)
            if (current.subject.public_bytes(), _key_id(current)) in self._root_ids:
                break
        else:
            return "untrusted"
        for depth, ca in enumerate(chain[1:], start=0):
            if now < ca.not_valid_before_utc:
                return "not_yet_valid"
            if now > ca.not_valid_after_utc:
                return "expired"
            bc = _ext(ca, x509.BasicConstraints)
            if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
                return "untrusted"
            # ``depth`` = number of CA certificates between this CA and the leaf.
            if bc.path_length is not None and depth > bc.path_length:
                return "path_length"
        return "untrusted"

    def _check_revocation(
        self,
        chain: tuple[x509.Certificate, ...],
        now: datetime,
        leaf_crl_issuers: tuple[bytes, ...] | None = None,
    ) -> None:
        """Every certificate below the anchor is checked against its issuer's CRL.
        ``leaf_crl_issuers``: the leaf's encoded cRLIssuer names, when already known."""
        for depth, (cert, issuer) in enumerate(itertools.pairwise(chain)):
            revocations = self._revocations_for(issuer)
            crl_issuers = (
                leaf_crl_issuers
                if depth == 0 and leaf_crl_issuers is not None
                else self._crl_issuer_ders(cert, cached=depth > 0)
            )
            indirect = next(
                (held for der in crl_issuers if (held := self._indirect.get(der)) is not None),
                None,
            )
            # An HQ indirect CRL lists certificates of any station CA: a listing counts for
            # every certificate (a thief's certificate without a CRLDP included).
            issuer_der = self._ca_id(issuer)[0]
            listed = next(
                (
                    r
                    for held in self._indirect.values()
                    if (r := held.reason_for_der(issuer_der, cert.serial_number)) is not None
                ),
                None,
            )
            if listed is not None:
                raise VerificationError(
                    f"{_describe(cert)} (serial {cert.serial_number:x}) is revoked by HQ: "
                    f"{listed.value}",
                    reason="revoked",
                )
            if indirect is not None:
                try:
                    indirect.check_fresh(now)
                except CrlError as exc:
                    raise VerificationError(exc.message, reason="crl_stale") from exc
                reason = None
                if revocations is not None:
                    reason = revocations.reason_for(cert.serial_number)  # adds, never blocks
                if reason is not None:
                    raise VerificationError(
                        f"{_describe(cert)} (serial {cert.serial_number:x}) is revoked: "
                        f"{reason.value}",
                        reason="revoked",
                    )
                continue
            if revocations is None:
                if self._require_crl:
                    raise VerificationError(
                        f"no CRL from {_describe(issuer)}; revocation cannot be checked",
                        reason="crl_missing",
                    )
                continue
            try:
                revocations.check_fresh(now)
            except CrlError as exc:
                raise VerificationError(exc.message, reason="crl_stale") from exc
            reason = revocations.reason_for(cert.serial_number)
            if reason is not None:
                raise VerificationError(
                    f"{_describe(cert)} (serial {cert.serial_number:x}) is revoked: {reason.value}",
                    reason="revoked",
                )


def verify_client_chain(
    leaf: x509.Certificate | bytes,
    intermediates: Sequence[x509.Certificate],
    *,
    roots: Sequence[x509.Certificate],
    crls: Iterable[x509.CertificateRevocationList],
    now: datetime,
    required_eku: ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    require_crl: bool = True,
) -> VerifiedIdentity:
    """One-shot form of :class:`ChainVerifier` (build a ChainVerifier for repeated use)."""
    verifier = ChainVerifier(
        roots, intermediates, crls, required_eku=required_eku, require_crl=require_crl
    )
    return verifier.verify(leaf, now=now)
