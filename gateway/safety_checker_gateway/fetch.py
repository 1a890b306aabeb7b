"""An image URL's bytes, under rules that keep the gateway from being a way into the network it runs in.

A data URL is decoded here. An http(s) URL is fetched only from a host on the
allow-list, and only at addresses that are public, unless the allow-list names
that address or its network: a private, loopback or link-local address is
refused even when an allowed name resolves to it. The connection goes to the
address that was checked (the name is sent as Host and TLS server name), so a
second resolution cannot swap it; each redirect is checked the same way; the
size and the whole fetch's time are bounded. No message repeats the URL: it
may carry a token, and a data URL is the image itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from typing import List, Optional, Union
from urllib.parse import urljoin

import httpx

from safety_checker_gateway.failures import RequestError, bad_request
from safety_checker_gateway.settings import Settings

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_REDIRECTS = (301, 302, 303, 307, 308)


def _refused(index: int, why: str) -> RequestError:
    return bad_request(f"input[{index}]: {why}", "input")


def data_url_bytes(url: str, index: int, max_bytes: int) -> bytes:
    """The bytes of `data:[<media type>];base64,<data>`."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise _refused(index, "a data URL must be data:<media type>;base64,<data>")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise _refused(index, f"the image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refused(index, "the data URL's data is not valid base64") from None
    if len(data) > max_bytes:
        raise _refused(index, f"the image is larger than the limit of {max_bytes} bytes")
    return data


def _public(address: Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_global and not address.is_multicast


class Fetcher:
    """Fetches image URLs for one gateway through one pooled HTTP client. `close()` at the end."""

    def __init__(self, settings: Settings, resolve=None) -> None:
        """`resolve(host, port)`: the addresses a name resolves to (the system's resolver unless given)."""
        self.settings = settings
        self._resolve = resolve or _system_resolve
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=settings.fetch_timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    async def image(self, url: object, index: int) -> bytes:
        """The bytes of input `index`'s image URL; a 400 naming the input and the reason otherwise."""
        if not isinstance(url, str) or not url:
            raise _refused(index, "image_url.url must be a non-empty string")
        if url[:5].lower() == "data:":
            return data_url_bytes(url, index, self.settings.max_image_bytes)
        try:
            return await asyncio.wait_for(self._fetch(url, index), self.settings.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise _refused(index, f"the image was not fetched within {self.settings.fetch_timeout_s:g} s") from None

    async def _fetch(self, url: str, index: int) -> bytes:
        for _ in range(self.settings.max_redirects + 1):
            try:
                target = httpx.URL(url)
            except (httpx.InvalidURL, ValueError):
                raise _refused(index, "the image URL is not a valid URL") from None
            if target.scheme not in ("http", "https") or not target.host:
                raise _refused(index, "an image URL must be a data URL, or http(s) to an allowed host")
            address = await self._permitted(target, index)
            request = self._client.build_request(
                "GET",
                target.copy_with(host=str(address)),
                headers={"Host": target.netloc.decode("ascii")},
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
            )
            try:
                response = await self._client.send(request, stream=True)
                try:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = urljoin(str(target), response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise _refused(index, f"the image host {target.host} answered HTTP {response.status_code}")
                    return await self._body(response, index)
                finally:
                    await response.aclose()
            except httpx.HTTPError as error:
                raise _refused(
                    index, f"the image host {target.host} could not be read: {type(error).__name__}"
                ) from None
        raise _refused(index, f"more than {self.settings.max_redirects} redirects")

    async def _body(self, response: httpx.Response, index: int) -> bytes:
        limit = self.settings.max_image_bytes
        too_large = _refused(index, f"the image is larger than the limit of {limit} bytes")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: List[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _permitted(self, target: httpx.URL, index: int) -> Address:
        """The address to connect to: the host must be allowed, and every address it has permitted."""
        host = target.host.lower().rstrip(".")
        literal = _address(host)
        if not (self._name_allowed(host) or (literal is not None and self._in_networks(literal))):
            raise _refused(index, f"the image host {host} is not on the gateway's allow-list")
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            addresses = [literal] if literal is not None else await self._resolve(host, port)
        except OSError:
            raise _refused(index, f"the image host {host} could not be resolved") from None
        if not addresses:
            raise _refused(index, f"the image host {host} could not be resolved")
        for address in addresses:
            if not (_public(address) or self._in_networks(address)):
                raise _refused(index, f"the image host {host} has an address that is not public ({address})")
        return addresses[0]

    def _name_allowed(self, host: str) -> bool:
        names = self.settings.allow_names
        return host in names or any(n.startswith("*.") and host.endswith(n[1:]) for n in names)

    def _in_networks(self, address: Address) -> bool:
        mapped = getattr(address, "ipv4_mapped", None)
        return any(a in n for a in (address, mapped) if a is not None for n in self.settings.allow_networks)


def _address(host: str) -> Optional[Address]:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def _system_resolve(host: str, port: int) -> List[Address]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
