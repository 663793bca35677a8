"""Which URLs and addresses the service may fetch for a stranger (SSRF defences).

By default only globally routable unicast addresses are allowed. IPv4 addresses embedded
in IPv6 forms (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64) are unwrapped and
checked again, because Python 3.11's `ipaddress` flags miss them (`::ffff:127.0.0.1` is
not `is_loopback`). The check runs in the connector's socket factory, so it sees the
address actually connected to: IP literals, every DNS answer and every redirect hop.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import AddrInfoType
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The well-known NAT64 prefix; the local-use 64:ff9b:1::/48 is not global, so it is blocked.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Shared-address space (RFC 6598): `is_global` is False for it in 3.11, listed to be explicit.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


NOT_PUBLIC = (
    "not a public address (to reach private networks, start the service with --allow-private-networks, "
    "or --allowed-networks CIDR,...)"
)


class BlockedAddressError(OSError):
    """Raised instead of connecting to an address the policy refuses."""

    def __init__(self, address: str) -> None:
        super().__init__(errno.EACCES, f"connecting to {address} is not allowed: {NOT_PUBLIC}")
        self.address = address


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, if any."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)  # (server, client)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # ::a.b.c.d, not :: or ::1
        found.append(ipaddress.IPv4Address(int(address)))
    return found


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast; an IPv6 form that carries IPv4 addresses is judged by them."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded:
            return all(is_public(inner) for inner in embedded)
    if not address.is_global or address.is_multicast or address.is_reserved or address.is_unspecified:
        return False
    return address not in _CGNAT


@dataclass(frozen=True)
class AddressPolicy:
    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_strings(cls, allow_private: bool, networks: Iterable[str]) -> AddressPolicy:
        """`networks` as CIDRs ("10.1.0.0/16", "::1/128"); raises ValueError on a bad one."""
        return cls(allow_private, tuple(ipaddress.ip_network(net.strip(), strict=False) for net in networks))

    def allows(self, host: str) -> bool:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
        if self.allow_private or any(address in network for network in self.allowed_networks):
            return True
        return is_public(address)

    def socket_factory(self, addr_info: AddrInfoType) -> socket.socket:
        """For `aiohttp.TCPConnector(socket_factory=...)`: refuse before the socket exists."""
        family, type_, proto, _, sockaddr = addr_info
        if not self.allows(sockaddr[0]):
            raise BlockedAddressError(sockaddr[0])
        return socket.socket(family=family, type=type_, proto=proto)


class PolicyResolver(AbstractResolver):
    """Drops DNS answers the policy refuses, so a name with one public and one private
    address still works and a name with only private ones fails clearly. The socket
    factory stays the authority: it also sees IP literals, which skip the resolver."""

    def __init__(self, inner: AbstractResolver, policy: AddressPolicy) -> None:
        self._inner = inner
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        allowed = [answer for answer in answers if self._policy.allows(answer["host"])]
        if not allowed:
            raise BlockedAddressError(", ".join(answer["host"] for answer in answers) + f" (for {host})")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def policy_connector(policy: AddressPolicy, resolver: PolicyResolver, limit: int) -> aiohttp.TCPConnector:
    """Connections only where `policy` allows (image downloads and webhooks alike), names
    resolved by `resolver` (which the caller closes: the connector does not own it)."""
    return aiohttp.TCPConnector(resolver=resolver, socket_factory=policy.socket_factory, limit=limit, ttl_dns_cache=60)


# Control characters are never part of a URL; lone surrogates (what a JSON \udcff escape
# decodes to) are not text at all and could not even be written back out.
_NEVER_IN_A_URL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_NEVER_IN_A_HOST = re.compile(r"[\s%]")
# A host of numbers only (octal 0177.0.0.1, hex 0x7f.1, 2130706433): resolvers read such
# forms differently (c-ares reads 0177.0.0.1 as 177.0.0.1), so only the dotted-decimal form is taken.
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?", re.IGNORECASE)


def url_problem(url: str, max_length: int | None = None) -> str | None:
    """Why `url` is not an absolute http(s) URL this service will fetch, or None."""
    if max_length is not None and len(url) > max_length:
        return f"URL is longer than {max_length} characters"
    if _NEVER_IN_A_URL.search(url):
        return "URL contains control characters or invalid Unicode"
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "not a valid URL"
    if parsed.scheme not in ("http", "https"):
        return "only absolute http and https URLs are accepted"
    if not parsed.host:
        return "URL has no host"
    if _NEVER_IN_A_HOST.search(parsed.host):
        return "URL host contains spaces or percent signs"
    if odd_numeric_host(parsed.host):
        return f"URL host {parsed.host} is not an IPv4 address in its usual form (four decimal numbers)"
    if parsed.user is not None or parsed.password is not None:
        return "URLs with user credentials are not accepted"
    return None


def odd_numeric_host(host: str) -> bool:
    """A host of numbers only that is not a dotted-decimal IPv4 address (0177.0.0.1, 0x7f.1)."""
    if not _NUMERIC_HOST.fullmatch(host):
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def url_host(url: str) -> str:
    """The host of `url` as written ("" if it is not a URL)."""
    try:
        return URL(url).raw_host or ""
    except (ValueError, TypeError):
        return ""
