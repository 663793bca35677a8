"""Outbound requests reach only public addresses unless the operator allows more."""

from __future__ import annotations

import ipaddress

import pytest

from service.fetch.policy import AddressPolicy, is_public, url_problem
from tests.conftest import ImageServer, ImageServerFactory, ServiceFactory, submit, wait_for_task

BLOCKED = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd00:ec2::254",
    "ff02::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",  # 6to4 of 127.0.0.1 and 169.254.169.254
    "2001:0:a00:1:0:0:f5ff:fffe",  # Teredo: server 10.0.0.1
    "2001:0:808:808:0:0:f5ff:fffe",  # Teredo: client 10.0.0.1 (obfuscated), server public
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1",  # NAT64
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    assert not AddressPolicy().allows(address)
    assert AddressPolicy(allow_private=True).allows(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
    assert AddressPolicy().allows(address)


def test_allow_list_opens_only_its_networks() -> None:
    policy = AddressPolicy.from_strings(False, ["10.1.0.0/16", "::1/128"])
    assert policy.allows("10.1.2.3") and policy.allows("::1")
    assert not policy.allows("10.2.0.1") and not policy.allows("127.0.0.1")


async def _item_errors(client, urls: list[str]) -> list[str | None]:  # type: ignore[no-untyped-def]
    task = await wait_for_task(client, (await submit(client, urls))["task_id"])
    assert task["status"] == "completed"
    return [item["error"]["code"] if item["error"] else None for item in task["items"]]


async def test_loopback_is_blocked_by_default_and_allowed_by_the_setting(
    make_real_service: ServiceFactory, image_server: ImageServer, make_image_server: ImageServerFactory
) -> None:
    ipv6_server = await make_image_server("::1")
    port, ipv6_port = image_server.server.port, ipv6_server.server.port
    urls = [
        f"http://127.0.0.1:{port}/photos/coffee",
        f"http://[::1]:{ipv6_port}/photos/coffee",
        f"http://[::ffff:127.0.0.1]:{port}/photos/coffee",
        f"http://localhost:{port}/photos/coffee",  # a name that resolves to loopback
    ]
    blocked = await make_real_service(allow_private_networks=False)
    assert await _item_errors(blocked, urls) == ["blocked_address"] * 4
    assert image_server.total_hits() == 0 and ipv6_server.total_hits() == 0  # nothing was fetched

    allowed = await make_real_service(allow_private_networks=True)
    assert await _item_errors(allowed, urls) == [None] * 4
    assert image_server.total_hits() == 3 and ipv6_server.total_hits() == 1


async def test_a_redirect_to_a_blocked_address_is_blocked(
    make_real_service: ServiceFactory, image_server: ImageServer, make_image_server: ImageServerFactory
) -> None:
    allowed_host = await make_image_server("127.0.0.2")
    client = await make_real_service(allow_private_networks=False, allowed_networks="127.0.0.2/32")
    target = image_server.url("/photos/coffee")  # 127.0.0.1: not in the allow-list
    urls = [
        allowed_host.url("/photos/coffee"),
        allowed_host.url("/redirect?to=" + target),
        allowed_host.url("/redirect?to=http://169.254.169.254/latest/meta-data/"),
    ]
    assert await _item_errors(client, urls) == [None, "blocked_address", "blocked_address"]
    assert image_server.total_hits() == 0
    assert allowed_host.hits["/redirect"] == 2


async def test_redirects_must_stay_on_http_without_credentials(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service()
    urls = [
        image_server.url("/redirect?to=ftp://example.com/a.jpg"),
        image_server.url("/redirect?to=file:///etc/passwd"),
        image_server.url("/redirect?to=http://user:secret@127.0.0.1/a.jpg"),
        image_server.url("/redirect?to=/photos/rocket"),  # relative: fine
    ]
    assert await _item_errors(client, urls) == ["invalid_redirect"] * 3 + [None]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://exa mple.com/a.jpg", "host contains spaces"),
        ("http://exa%20mple.com/a.jpg", "host contains spaces or percent"),
        ("http://exa\x00mple.com/a.jpg", "control characters"),
        ("http://example.com/a\r\nb.jpg", "control characters"),
        ("http://example.com/\udcff.jpg", "invalid Unicode"),  # a redirect's Location can carry one too
        ("http://example.com/a b.jpg", None),  # a space in the path is only badly escaped
        ("http://b\u00fccher.de/a.jpg", None),
        ("http://[2001:db8::1]:8080/a.jpg", None),
    ],
)
def test_url_text_that_is_never_a_host_or_a_url_is_refused(url: str, problem: str | None) -> None:
    found = url_problem(url)
    assert found is None if problem is None else (found is not None and problem in found), found
