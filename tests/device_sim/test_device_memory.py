"""What a simulated device keeps in memory is bounded as a real device's is: the current
payload key and the one before it, the LDevID before the current one (a fleet of 10,000
simulated devices used to grow at every rotation: docs/scale.md, "Soak")."""

from __future__ import annotations

from device_sim.credentials import KEPT_PAYLOAD_KEYS, KEPT_PREVIOUS_LDEVIDS, Registered
from signers.software import SoftwareKey
from tests.fixtures.pki import shared_pki
from trustcore.payload import PayloadKey


def test_a_device_keeps_the_current_and_the_previous_payload_key_and_ldevid() -> None:
    pki = shared_pki()
    keys = [PayloadKey.generate() for _ in range(4)]
    reg = Registered(
        ldevid=pki.root,  # any certificates: only their identity matters here
        site_ca=pki.site_ca,
        ldevid_key=SoftwareKey.ephemeral(),
        wrap_key=SoftwareKey.ephemeral(),
        payload_keys={keys[0].key_id: keys[0]},
        current_key_id=keys[0].key_id,
    )
    reg.adopt_payload_key(keys[1])
    assert set(reg.payload_keys) == {keys[0].key_id, keys[1].key_id}
    for key in keys[2:]:
        reg.adopt_payload_key(key)
    assert KEPT_PAYLOAD_KEYS == 2
    assert list(reg.payload_keys) == [keys[2].key_id, keys[3].key_id]
    assert reg.current_key is keys[3]
    reg.adopt_payload_key(keys[3])  # the same key again (a renewal's answer): nothing lost
    assert list(reg.payload_keys) == [keys[2].key_id, keys[3].key_id]

    certificates = [pki.station_ca, pki.site_ca, pki.root]
    for cert in certificates:
        reg.replace_ldevid(cert, pki.site_ca, SoftwareKey.ephemeral())
    assert KEPT_PREVIOUS_LDEVIDS == 1
    assert reg.ldevid is certificates[-1]
    assert reg.previous == [certificates[-2]]
