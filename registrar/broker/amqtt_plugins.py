"""amqtt plugins of the embedded broker: certificate identity, authorization and topic ACL.

The embedded broker (:mod:`registrar.broker.embedded`) derives a :class:`Principal` from the
*verified* TLS client certificate and binds it to the amqtt ``Session`` before any plugin
runs; the MQTT username and password are never looked at. The plugins below only read that
binding, so a session that somehow lacks one is refused (fail closed):

* :class:`CertificateAuthPlugin` (CONNECT): bound, not blocked, and a will message (which
  amqtt publishes without a PUBLISH check) only on a topic the principal may publish to;
* :class:`TopicAclPlugin` (SUBSCRIBE, PUBLISH and RECEIVE, i.e. every delivery): the topic
  rules of :mod:`trustcore.topics`, plus the block list, checked on every single message so
  ``block`` takes effect on live sessions at once.

Both get the one shared :class:`AccessPolicy` through their (strict, dacite) ``Config``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from registrar.broker import REGISTRAR_IDENTITY
from trustcore.identity import DeviceId
from trustcore.topics import (
    DEVICE_PREFIX,
    REGISTRATION_PREFIX,
    Access,
    AccessRule,
    Listener,
    device_access,
)

__all__ = [
    "AccessPolicy",
    "CertificateAuthPlugin",
    "Principal",
    "TopicAclPlugin",
    "device_principal",
    "service_principal",
]

log = logging.getLogger(__name__)

#: Attribute under which the principal is stored on an amqtt ``Session`` (Session defines
#: ``__eq__`` without ``__hash__``, so it cannot key a dict or a WeakKeyDictionary).
_PRINCIPAL_ATTR = "_devtrust_principal"


@dataclass(frozen=True)
class Principal:
    """Who a session is (from its certificate), where it came in, and what it may touch."""

    identity: str
    listener: Listener
    rules: tuple[AccessRule, ...]

    def allows(self, access: Access, topic: str) -> bool:
        return any(rule.allows(access, topic) for rule in self.rules)

    def may_receive(self, topic: str) -> bool:
        """Delivery of a message on ``topic``: only what the principal could subscribe to
        exactly (a topic name is a filter without wildcards)."""
        return self.allows(Access.SUBSCRIBE, topic)


def device_principal(device_id: DeviceId, listener: Listener) -> Principal:
    return Principal(device_id.value, listener, (device_access(device_id, listener),))


def service_principal() -> Principal:
    """The registrar's own client: every registration topic and every device subtree, and
    only on the operational listener (its certificate comes from the site CA)."""
    return Principal(
        REGISTRAR_IDENTITY,
        Listener.OPERATIONAL,
        (
            AccessRule(subtree=tuple(REGISTRATION_PREFIX.split("/"))),
            AccessRule(subtree=(DEVICE_PREFIX,)),
        ),
    )


class AccessPolicy:
    """Session bindings and the block list, shared by the broker and its plugins."""

    def __init__(self) -> None:
        self._blocked: set[str] = set()

    # -- block list
    def block(self, identity: str) -> None:
        self._blocked.add(identity)

    def unblock(self, identity: str) -> None:
        self._blocked.discard(identity)

    def is_blocked(self, identity: str) -> bool:
        return identity in self._blocked

    # -- bindings
    @staticmethod
    def bind(session: Session, principal: Principal) -> None:
        setattr(session, _PRINCIPAL_ATTR, principal)

    @staticmethod
    def principal_of(session: Session | None) -> Principal | None:
        found = getattr(session, _PRINCIPAL_ATTR, None)
        return found if isinstance(found, Principal) else None

    # -- decisions (bools, never exceptions: an exception must not become "allow")
    def may_connect(self, session: Session | None) -> bool:
        principal = self.principal_of(session)
        if principal is None or session is None:
            log.warning("connect refused: session without a certificate identity")
            return False
        if self.is_blocked(principal.identity):
            log.warning("connect refused: identity %s is blocked", principal.identity)
            return False
        if session.client_id != principal.identity:
            log.warning("connect refused: client id does not match %s", principal.identity)
            return False
        if session.will_flag:
            topic = session.will_topic
            if not isinstance(topic, str) or not principal.allows(Access.PUBLISH, topic):
                log.warning(
                    "connect refused: %s asked for a will on a foreign topic", principal.identity
                )
                return False
        return True

    def may(self, session: Session | None, action: Action | None, topic: str | None) -> bool:
        principal = self.principal_of(session)
        if principal is None or topic is None or self.is_blocked(principal.identity):
            return False
        if action is Action.PUBLISH:
            return principal.allows(Access.PUBLISH, topic)
        if action is Action.SUBSCRIBE:
            return principal.allows(Access.SUBSCRIBE, topic)
        if action is Action.RECEIVE:
            return principal.may_receive(topic)
        return False  # an action this code does not know: refuse


class CertificateAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """CONNECT is allowed for a certificate-bound, unblocked principal; nothing else."""

    @dataclass
    class Config:
        policy: AccessPolicy

    async def authenticate(self, *, session: Session) -> bool | None:
        policy: AccessPolicy = self.config.policy
        return policy.may_connect(session)


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """SUBSCRIBE, PUBLISH and RECEIVE by the principal's topic rules."""

    @dataclass
    class Config:
        policy: AccessPolicy

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        policy: AccessPolicy = self.config.policy
        allowed = policy.may(session, action, topic)
        if not allowed and action is not Action.RECEIVE:
            principal = policy.principal_of(session)
            log.info(
                "topic refused: %s %s %r",
                principal.identity if principal else "?",
                action.value if action else "?",
                topic,
            )
        return allowed
