"""Reading identities back out of certificates: device, station and site ids.

Owns the cross-checks a reader makes before it trusts an id (a device's CN, serialNumber
and hardwareModuleName SAN must agree). Users import these from :mod:`trustcore.profiles`,
which re-exports them.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from trustcore.cert_builder import OID_HARDWARE_MODULE_NAME, OID_HW_TYPE_DEVICE
from trustcore.der import decode_hardware_module_name
from trustcore.errors import X509_PARSE_ERRORS, EncodingError, InvalidValueError, ProfileError
from trustcore.identity import DeviceId, SiteId, StationId

__all__ = [
    "device_id_from_certificate",
    "site_id_from_certificate",
    "station_id_from_certificate",
]


def _single_attribute(name: x509.Name, oid: ObjectIdentifier, label: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise ProfileError(f"subject must hold exactly one {label}")
    return values[0].value


#: A name that is not a valid id, or a subject / SAN that does not parse at all (hostile DER
#: raises only when the field is first read).
_IDENTITY_ERRORS: tuple[type[Exception], ...] = (
    EncodingError,
    InvalidValueError,
    *X509_PARSE_ERRORS,
)


def device_id_from_certificate(
    cert: x509.Certificate, *, hw_type: ObjectIdentifier = OID_HW_TYPE_DEVICE
) -> DeviceId:
    """The device id of an IDevID/LDevID, after cross-checking CN, serialNumber and SAN.

    All three must name the same device: a certificate whose CN (what Mosquitto uses) says
    one device and whose SAN (what the registrar may log) says another is refused.
    """
    try:
        subject = cert.subject  # each access builds the Name anew
        cn = _single_attribute(subject, NameOID.COMMON_NAME, "CN")
        serial = _single_attribute(subject, NameOID.SERIAL_NUMBER, "serialNumber")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise ProfileError("device certificate has no SAN", reason="missing_san") from exc
        others = [
            o
            for o in san.get_values_for_type(x509.OtherName)
            if o.type_id == OID_HARDWARE_MODULE_NAME
        ]
        if len(others) != 1:
            raise ProfileError(
                "device certificate needs exactly one hardwareModuleName SAN", reason="missing_san"
            )
        found_type, hw_serial = decode_hardware_module_name(others[0].value)
        if found_type != hw_type:
            raise ProfileError(f"unexpected hwType {found_type.dotted_string}")
        try:
            san_id = hw_serial.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProfileError("hwSerialNum is not ASCII") from exc
        device_id = DeviceId(cn)
    except _IDENTITY_ERRORS as exc:
        raise ProfileError(f"device identity is malformed: {exc}") from exc
    if not cn == serial == san_id:
        raise ProfileError(
            f"device identity mismatch: CN={cn!r} serialNumber={serial!r} SAN={san_id!r}"
        )
    return device_id


def station_id_from_certificate(cert: x509.Certificate) -> StationId:
    """The station id of a station CA certificate (subject serialNumber)."""
    try:
        return StationId(_single_attribute(cert.subject, NameOID.SERIAL_NUMBER, "serialNumber"))
    except _IDENTITY_ERRORS as exc:
        raise ProfileError(f"station id is malformed: {exc}") from exc


def site_id_from_certificate(cert: x509.Certificate) -> SiteId:
    """The site id of a site CA certificate (subject serialNumber)."""
    try:
        return SiteId(_single_attribute(cert.subject, NameOID.SERIAL_NUMBER, "serialNumber"))
    except _IDENTITY_ERRORS as exc:
        raise ProfileError(f"site id is malformed: {exc}") from exc
