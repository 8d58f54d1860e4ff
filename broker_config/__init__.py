"""Mosquitto configuration for the site broker: templates and their pure renderer.

``templates/`` holds ``mosquitto.conf.tmpl``, ``registration_acl.tmpl`` and
``operational_acl.tmpl``; :mod:`broker_config.render` turns a
:class:`~broker_config.render.MosquittoConfig` into their text and splits the site's CA
bundles and CRLs per listener (:func:`~broker_config.render.listener_trust`), all without
I/O. The process manager that writes the files and runs Mosquitto is
:mod:`registrar.broker.mosquitto`; an operator who runs Mosquitto himself renders the same
files with these functions.

Security decisions baked into the templates (details in ``docs/broker.md``, "Mosquitto"):

* both device listeners are mutual TLS (``require_certificate``) with the certificate CN as
  the MQTT username and as the client id, so a device cannot take over another's session;
* ``per_listener_settings true``: each device listener has its own ACL file, because
  Mosquitto's ACLs do not otherwise know which listener a session came in on. The
  registration listener grants a device only its request/response pair, the operational
  listener only ``devices/<id>/...`` and, to the registrar's identity, everything it needs;
* each listener's CRL file holds only the CRLs of that listener's issuing CAs, so a leaf of
  the other hierarchy fails the handshake even when it sends a chain up to the shared root;
* the dynamic-security plugin lives on a loopback-only admin listener, only to kick live
  sessions; blocking an identity is a ``topic deny #`` in both ACL files;
* the server key is never a file on disk: ``keyfile`` is a named pipe the registrar feeds
  from memory (see ``registrar.broker.mosquitto_process``).
"""
