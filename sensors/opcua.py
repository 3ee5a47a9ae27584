"""The OPC UA source: one subscription to a server's nodes (asyncua), each data change as a
channel value at its source timestamp, message security and user login, and a dead server
detected so the base reconnects."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent, Subscription
from asyncua.crypto import security_policies
from asyncua.ua import uaerrors
from asyncua.ua.uaerrors import UaError, UaStatusCodeError, UaStringParsingError
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from config.sensors import OpcUaNode, OpcUaSensor
from sensors.base import SourceError, utc_now
from sensors.live import LiveSource

log = logging.getLogger(__name__)

# Status codes that say the link, the channel or the session failed rather than that the request
# was wrong: connecting again can succeed.
LINK_FAILURES: tuple[type[UaStatusCodeError], ...] = (
    uaerrors.BadTimeout,
    uaerrors.BadRequestTimeout,
    uaerrors.BadCommunicationError,
    uaerrors.BadNoCommunication,
    uaerrors.BadConnectionClosed,
    uaerrors.BadServerNotConnected,
    uaerrors.BadServerHalted,
    uaerrors.BadShutdown,
    uaerrors.BadServerTooBusy,
    uaerrors.BadTooManySessions,
    uaerrors.BadMaxConnectionsReached,
    uaerrors.BadTcpServerTooBusy,
    uaerrors.BadTcpInternalError,
    uaerrors.BadTcpSecureChannelUnknown,
    uaerrors.BadSecureChannelClosed,
    uaerrors.BadSecureChannelIdInvalid,
    uaerrors.BadSecureChannelTokenUnknown,
    uaerrors.BadSessionClosed,
    uaerrors.BadSessionIdInvalid,
    uaerrors.BadSessionNotActivated,
    uaerrors.BadSubscriptionIdInvalid,
)
# The server refused who we are: the same user name and password will be refused again.
LOGIN_REFUSED: tuple[type[UaStatusCodeError], ...] = (
    uaerrors.BadUserAccessDenied,
    uaerrors.BadIdentityTokenInvalid,
    uaerrors.BadIdentityTokenRejected,
    uaerrors.BadUserSignatureInvalid,
)
# The server refused the secure channel: the certificates, key or policy need fixing.
SECURITY_REFUSED: tuple[type[UaStatusCodeError], ...] = (
    uaerrors.BadSecurityChecksFailed,
    uaerrors.BadSecurityPolicyRejected,
    uaerrors.BadSecurityModeRejected,
    uaerrors.BadSecurityModeInsufficient,
    uaerrors.BadNoValidCertificates,
    uaerrors.BadCertificateInvalid,
    uaerrors.BadCertificateUntrusted,
    uaerrors.BadCertificateUriInvalid,
    uaerrors.BadCertificateHostNameInvalid,
    uaerrors.BadCertificateTimeInvalid,
    uaerrors.BadCertificateUseNotAllowed,
    uaerrors.BadCertificateRevoked,
    uaerrors.BadCertificateChainIncomplete,
)
SECURITY_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256Sha256RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
SECURITY_MODES = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_SHOWN_CHARS = 40


@dataclass(frozen=True, slots=True)
class Credentials:
    """The client's certificate and key and the server's certificate (None: take the one the
    server offers), all DER, and the application URI the client certificate names."""

    certificate: bytes
    private_key: bytes
    server_certificate: bytes | None
    application_uri: str


class OpcUaSource(LiveSource):
    """Values of OPC UA nodes by subscription: the server sends each change (at most one per node
    per `publishing_interval`), and its source timestamp places it in the windows.

    One session per connection: a node the server does not know (or will not let us read) is a
    data-quality record naming it and the other nodes flow; when none can be subscribed the
    session fails and reconnects (a server still building its address space). A value that is not
    a number (Booleans count 1/0) or whose status is not Good (Bad or Uncertain) is a `malformed`
    record naming the node. The client's watchdog reads the server state every `timeout`; a dead
    server, a dropped socket or a subscription the server ended fails the session and the base
    reconnects with backoff.
    """

    transient = (OSError, *LINK_FAILURES)  # OSError covers ConnectionError and TimeoutError

    def __init__(self, cfg: OpcUaSensor) -> None:
        channels = list(dict.fromkeys(node.channel for node in cfg.nodes))
        super().__init__(
            cfg,
            channels,
            # Data changes carry source timestamps and come at most a publishing interval (plus
            # a slow link) after them.
            lateness_s=cfg.publishing_interval + cfg.timeout,
        )
        self.cfg = cfg
        self.health.extra["data_changes"] = 0.0
        self.health.extra["nodes_subscribed"] = 0.0
        # Across sessions: the time of the last value published, and each node's last source
        # timestamp.
        self._previous: datetime | None = None
        self._last_stamp: dict[ua.NodeId, datetime] = {}

    async def _session(self) -> None:
        nodes = self._parsed_nodes()
        client = Client(self.cfg.url, timeout=self.cfg.timeout, watchdog_intervall=self.cfg.timeout)
        # A short session timeout lets the server drop the session of a client that vanished
        # (power cut) soon, instead of holding it for the library's default hour.
        client.session_timeout = max(60_000, int(self.cfg.timeout * 4_000))
        if self.cfg.username is not None:
            client.set_user(self.cfg.username)
        if self.cfg.password is not None:
            client.set_password(self.cfg.password)
        connected = link_lost = False
        try:
            try:
                await self._secure(client)
                await client.connect()
                connected = True
                subscription = await self._subscribe(client, nodes)
            except self.transient:
                raise
            except UaError as exc:
                raise SourceError(self.name, self._explained(exc), retryable=False) from exc
            self._connected()
            try:
                await self._receive(client, subscription, nodes)
            except self.transient:
                link_lost = True
                raise
        finally:
            await _close(client, connected=connected, link_lost=link_lost)

    def _parsed_nodes(self) -> dict[ua.NodeId, list[OpcUaNode]]:
        """The configured nodes by node id (one node may feed several channels)."""
        nodes: dict[ua.NodeId, list[OpcUaNode]] = {}
        for node in self.cfg.nodes:
            try:
                node_id = ua.NodeId.from_string(node.node_id)
            except UaStringParsingError:
                raise SourceError(
                    self.name,
                    f"node id {node.node_id!r} (channel {node.channel!r}) is not an OPC UA node "
                    "id; write it like ns=2;s=Gearbox.Temp or ns=3;i=1042",
                    retryable=False,
                ) from None
            nodes.setdefault(node_id, []).append(node)
        return nodes

    async def _secure(self, client: Client) -> None:
        if self.cfg.security_mode == "None":
            return
        credentials = await asyncio.to_thread(self._read_credentials)
        # Servers check that the client's application URI is the one its certificate names.
        client.application_uri = credentials.application_uri
        await client.set_security(
            SECURITY_POLICIES[self.cfg.security_policy],
            credentials.certificate,
            credentials.private_key,
            server_certificate=credentials.server_certificate,
            mode=SECURITY_MODES[self.cfg.security_mode],
        )

    def _read_credentials(self) -> Credentials:
        """The certificate files, read and checked here so a bad one is named (asyncua guesses PEM
        or DER from the file name and fails obscurely)."""
        cfg = self.cfg
        if cfg.certificate is None or cfg.private_key is None:  # the config model forbids it
            raise SourceError(
                self.name,
                f"security_mode {cfg.security_mode} needs certificate and private_key",
                retryable=False,
            )
        certificate = self._load_certificate(cfg.certificate, "certificate")
        uris = _application_uris(certificate)
        if not uris:
            raise SourceError(
                self.name,
                f"certificate {cfg.certificate} has no URI in subjectAltName: OPC UA needs the "
                "client's application URI there",
                retryable=False,
            )
        content = self._read_file(cfg.private_key, "private_key")
        try:
            if content.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_private_key(content, password=None)
            else:
                key = serialization.load_der_private_key(content, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SourceError(
                self.name,
                f"private_key {cfg.private_key} is not an unencrypted PEM or DER private key "
                f"({exc})",
                retryable=False,
            ) from None
        server_certificate = (
            None
            if cfg.server_certificate is None
            else self._load_certificate(cfg.server_certificate, "server_certificate")
        )
        return Credentials(
            certificate=certificate.public_bytes(serialization.Encoding.DER),
            private_key=key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            server_certificate=None
            if server_certificate is None
            else server_certificate.public_bytes(serialization.Encoding.DER),
            application_uri=uris[0],
        )

    def _load_certificate(self, path: Path, field: str) -> x509.Certificate:
        content = self._read_file(path, field)
        try:
            if content.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(content)
            return x509.load_der_x509_certificate(content)
        except ValueError as exc:
            raise SourceError(
                self.name,
                f"{field} {path} is not a PEM or DER X.509 certificate ({exc})",
                retryable=False,
            ) from None

    def _read_file(self, path: Path, field: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SourceError(
                self.name, f"cannot read {field} {path}: {exc.strerror or exc}", retryable=False
            ) from None

    async def _subscribe(
        self, client: Client, nodes: dict[ua.NodeId, list[OpcUaNode]]
    ) -> Subscription:
        """Subscribe to every node; one the server refuses is a quality record naming it."""
        interval_ms = self.cfg.publishing_interval * 1000
        subscription = await client.create_subscription(interval_ms, None)
        node_ids = list(nodes)
        results = await subscription.subscribe_data_change(
            [client.get_node(node_id) for node_id in node_ids],
            sampling_interval=ua.Double(interval_ms),
        )
        refused: list[str] = []
        for node_id, result in zip(node_ids, results, strict=True):
            if isinstance(result, ua.StatusCode):
                channels = ", ".join(node.channel for node in nodes[node_id])
                refused.append(f"{node_id.to_string()}: {result.name}")
                self.quality.add(
                    "malformed",
                    f"node {node_id.to_string()} (channel {channels}) cannot be subscribed: "
                    f"{result.name} ({result.doc})",
                )
        self.health.extra["nodes_subscribed"] = float(len(node_ids) - len(refused))
        if len(refused) == len(node_ids):
            raise SourceError(
                self.name,
                f"the server at {self.cfg.url} refused every node: {'; '.join(refused)}",
                retryable=True,
            )
        return subscription

    async def _receive(
        self,
        client: Client,
        subscription: Subscription,
        nodes: dict[ua.NodeId, list[OpcUaNode]],
    ) -> None:
        """Publish data changes until the link or the subscription fails.

        A lost link reaches us as a bad status change (the client's watchdog sends one); the
        check on every quiet `timeout` also catches a client that went down without one.
        """
        reported: set[ua.NodeId] = set()
        while True:
            # Not `next_event(timeout)`: its wait_for can swallow a cancellation that arrives
            # as an event does (Python 3.11), and the source would not stop.
            try:
                async with asyncio.timeout(self.cfg.timeout):
                    event = await anext(subscription)
            except TimeoutError:
                if client.state is not UaClientState.CONNECTED:
                    raise ConnectionError(f"lost the connection to {self.cfg.url}") from None
                continue
            except StopAsyncIteration:
                return  # the subscription was closed under us
            if isinstance(event, StatusChangeEvent):
                status = event.notification.Status
                if not status.is_good():
                    # asyncua reports a lost link this way too (as BadShutdown).
                    raise ConnectionError(
                        f"the subscription to {self.cfg.url} ended ({status.name}): the server "
                        "stopped or the link failed"
                    )
            elif isinstance(event, DataChangeEvent):
                node_id = event.node.nodeid
                first = node_id not in reported
                reported.add(node_id)
                self._on_data_change(node_id, nodes[node_id], event, first=first)

    def _on_data_change(
        self,
        node_id: ua.NodeId,
        nodes: list[OpcUaNode],
        event: DataChangeEvent,
        *,
        first: bool,
    ) -> None:
        self.health.extra["data_changes"] += 1
        data_value = event.data.monitored_item.Value
        name = node_id.to_string()
        status = data_value.StatusCode
        if status is not None and not status.is_good():
            self.quality.add("malformed", f"node {name}: status {status.name} ({status.doc})")
            return
        raw = event.value
        value = _as_number(raw)
        if value is None:
            shown = repr(raw)
            if len(shown) > _SHOWN_CHARS:
                shown = shown[: _SHOWN_CHARS - 3] + "..."
            self.quality.add(
                "malformed", f"node {name}: {type(raw).__name__} value {shown} is not a number"
            )
            return
        stamp = data_value.SourceTimestamp or data_value.ServerTimestamp
        ts = utc_now() if stamp is None else _aware(stamp)
        # The first change after subscribing is the node's current value, stamped when it last
        # changed: after a reconnect maybe the very sample we already have, or one from hours ago,
        # older than values of other nodes already published. Repeating the first, or going back
        # in time for the second, would be false data (and a false clock_backwards record); the
        # value still holds, so it counts from the previous value's time.
        if first and self._last_stamp.get(node_id) == ts:
            return
        self._last_stamp[node_id] = ts
        if first and self._previous is not None and ts < self._previous:
            ts = self._previous
        self._previous = ts
        self._publish({node.channel: value * node.scale + node.offset for node in nodes}, ts)

    def _explained(self, exc: UaError) -> str:
        """What a permanent OPC UA error means for the operator."""
        url = self.cfg.url
        if isinstance(exc, LOGIN_REFUSED):
            who = (
                f"user {self.cfg.username!r}"
                if self.cfg.username is not None
                else "anonymous login"
            )
            return (
                f"the server at {url} refused {who} ({_status_name(exc)}): check username and "
                "password"
            )
        if isinstance(exc, SECURITY_REFUSED):
            return (
                f"the server at {url} refused the secure channel ({_status_name(exc)}): check "
                "security_policy, certificate, private_key and server_certificate, and that the "
                "server trusts the client certificate"
            )
        if isinstance(exc, UaStatusCodeError):
            return f"the server at {url} answered {_status_name(exc)}: {exc}"
        if str(exc).startswith("No matching endpoints"):  # asyncua's words, from find_endpoint
            policy = "" if self.cfg.security_mode == "None" else f" and {self.cfg.security_policy}"
            return (
                f"the server at {url} offers no endpoint with security_mode "
                f"{self.cfg.security_mode}{policy}: configure one it offers"
            )
        return f"{url}: {exc}"


def _status_name(exc: UaStatusCodeError) -> str:
    return ua.StatusCode(exc.code).name


def _as_number(raw: object) -> float | None:
    """A numeric OPC UA value as a float (Boolean as 1/0); None for anything else."""
    if isinstance(raw, int | float):  # bool is an int: True counts 1
        return float(raw)
    return None


def _aware(stamp: datetime) -> datetime:
    """OPC UA times are UTC; asyncua gives them aware, older versions naive."""
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


def _application_uris(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(names.value.get_values_for_type(x509.UniformResourceIdentifier))


async def _close(client: Client, *, connected: bool, link_lost: bool) -> None:
    """End the session and the socket, and the client's tasks; a failure here must not hide
    the one that ended the session."""
    if not connected:
        client.disconnect_socket()
        return
    protocol = client.uaclient.protocol
    if link_lost and protocol is not None and not protocol.is_closed:
        # A silent link stays open: closing the session over it would wait `timeout` for an
        # answer that cannot come. Closed first, the socket reports it at once (next loop turn)
        # and the client skips the goodbye.
        protocol.disconnect_socket()
        await asyncio.sleep(0)
    try:
        await client.disconnect()
    except Exception as exc:
        log.debug("disconnecting from %s: %r", client.server_url.geturl(), exc)
        client.disconnect_socket()
