"""The host names the server answers to (--allowed-hosts): its guard against DNS rebinding.

A web page can re-point its own host name at 127.0.0.1 once it has loaded (DNS rebinding): the browser
then takes a server on the user's loopback for the page's own origin, and lets the page call it and
read every answer. Such a request still names the page's host in its Host header, so a server that
answers only the names it is reached by on this machine (localhost, loopback addresses) is out of the
page's reach. The setting is resolved once at start-up (resolve_allowed_hosts); requests are matched
against names only, never looked up in DNS."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, replace

import idna

LOCALHOST = "localhost"
# A DNS name as browsers send it (international names as punycode), without a trailing dot.
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]*")
# A host whose last label is a number is an IPv4 address in the URL standard, in any of inet_aton's
# spellings (127.1, 0x7f.0.0.1, 2130706433): browsers send it as its dotted quad, curl as typed.
_NUMBER_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


@dataclass(frozen=True)
class AllowedHosts:
    """The hosts a request's Host header may name, besides localhost, its subdomains (*.localhost)
    and the loopback addresses: those are always allowed, as no page on another host can send them as
    its own."""

    # Lowercase, without a trailing dot; IPv6 addresses compressed, without brackets.
    names: frozenset[str] = frozenset()
    # "*.example.com" allows any name under example.com: these are the parents ("example.com").
    parents: frozenset[str] = frozenset()
    # "*": any host (nothing is checked).
    any_host: bool = False

    def allows(self, host: str) -> bool:
        """Whether a request whose Host header is `host` (as sent: any case, any port) is answered."""
        if self.any_host:
            return True
        name = host_name(host)
        if name is None:
            return False
        if name in self.names or is_loopback_name(name):
            return True
        return any(name.endswith(f".{parent}") for parent in self.parents)

    def allows_origin(self, origin: str) -> bool:
        """Whether a request whose Origin header is `origin` is answered: a page's requests name the
        page's origin, and one on another site may not use this server from the browser of whoever
        opens it, though it cannot read the answers (a form's or a no-cors fetch's POST needs no CORS
        preflight). Browser extensions and apps' web views (chat and translation front-ends) send
        their own, which no page can."""
        if self.any_host or is_extension_origin(origin):
            return True
        host = origin_host(origin)
        return host is not None and self.allows(host)


ANY_HOST = AllowedHosts(any_host=True)


# The schemes of pages that installed software shows, whose requests name them as their Origin: browser
# extensions (Chrome and Edge, Firefox, Safari), desktop apps' web views (Electron's app:// and file://,
# Tauri) and VS Code's web views. No page on a site can send requests as one of these; a file opened in a
# browser sends "null", as a sandboxed frame of any site does, and stays refused.
EXTENSION_SCHEMES = frozenset(
    {
        "chrome-extension",
        "moz-extension",
        "safari-web-extension",
        "app",
        "file",
        "tauri",
        "vscode-webview",
        "vscode-file",
    }
)


def is_extension_origin(origin: str) -> bool:
    """Whether an Origin header's value ("chrome-extension://<id>") names a page of installed software:
    a browser extension, a desktop app's or an editor's web view."""
    scheme, separator, _ = origin.partition("://")
    return bool(separator) and scheme.lower() in EXTENSION_SCHEMES


def origin_host(origin: str) -> str | None:
    """The host (with its port) of an Origin header's value ("https://example.com:8443"); None for an
    origin that names none ("null": a sandboxed frame, a file opened in the browser)."""
    scheme, separator, rest = origin.partition("://")
    if not (scheme and separator and rest) or "/" in rest:
        return None
    return rest


def host_name(host: str) -> str | None:
    """The host of a Host header value or an --allowed-hosts entry: lowercase, without its port and a
    trailing dot, an IPv6 address compressed and out of its brackets; None for what names no host."""
    name, port = split_port(host.strip().lower())
    if port is not None and not _PORT.fullmatch(port):
        return None
    if name.startswith("["):
        return _ipv6(name[1:-1]) if name.endswith("]") else None
    if ":" in name:  # an IPv6 address without brackets (as --host and --allowed-hosts may write one)
        return _ipv6(name)
    name = name.removesuffix(".")
    if not _NAME.fullmatch(name):
        return None
    return _dotted_quad(name) if _NUMBER_LABEL.fullmatch(name.rpartition(".")[2]) else name


def split_port(host: str) -> tuple[str, str | None]:
    """`host` as its host and its port (None where it gives none)."""
    if host.startswith("["):
        bracketed, bracket, rest = host.partition("]")
        if bracket and rest.startswith(":"):
            return f"{bracketed}]", rest[1:]
        return host, None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, None


def _dotted_quad(name: str) -> str | None:
    """An IPv4 address in any of its spellings as its dotted quad (the form --allowed-hosts and the
    loopback check compare); None where the numbers make no address (1.2.3.4.5, 256.0.0.1)."""
    try:
        return socket.inet_ntoa(socket.inet_aton(name))
    except OSError:
        return None


def _ipv6(address: str) -> str | None:
    try:
        # A zone in a URL is written "%25eth0" (RFC 6874).
        return str(ipaddress.IPv6Address(address.replace("%25", "%")))
    except ValueError:
        return None


def is_loopback_name(name: str) -> bool:
    """localhost, a name under it (RFC 6761: both resolve to loopback only), or a loopback address."""
    if name == LOCALHOST or name.endswith(f".{LOCALHOST}"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def parse_allowed_hosts(text: str) -> AllowedHosts:
    """--allowed-hosts' value: comma-separated host names, "*.example.com" for any name under
    example.com, "*" for any host. ValueError for an entry that is none of those."""
    names: set[str] = set()
    parents: set[str] = set()
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise ValueError("give one or more host names, comma-separated, or '*' for any host")
    for entry in entries:
        if entry == "*":
            return ANY_HOST
        under = entry.startswith("*.")
        pattern = _ascii_name(entry.removeprefix("*."))
        name = host_name(pattern)
        if name is None or (under and not _NAME.fullmatch(name)):
            raise ValueError(
                f"{entry!r} is not a host name: give names such as example.com, 192.168.1.5 or [::1], "
                "or *.example.com for every name under example.com"
            )
        if split_port(pattern)[1] is not None:
            raise ValueError(f"{entry!r}: give the host name without a port (every port is answered)")
        (parents if under else names).add(name)
    return AllowedHosts(frozenset(names), frozenset(parents))


def _ascii_name(name: str) -> str:
    """An international name as browsers send it in Host: punycode after UTS #46's mapping, as the URL
    standard has it ("bücher.example" is "xn--bcher-kva.example", "straße" keeps its ß); the name as
    given where it is ASCII already or not a name IDNA takes."""
    if name.isascii():
        return name
    try:
        return str(idna.encode(name, uts46=True, transitional=False).decode("ascii"))
    except idna.IDNAError:
        return name  # refused as no host name below


def resolve_allowed_hosts(given: AllowedHosts | None, bind_host: str) -> AllowedHosts:
    """The hosts the server answers to: `given` (--allowed-hosts), else the loopback names only where
    `bind_host` listens on loopback only, else any host (users reach such a server by its addresses
    and whatever names point at them). The bound name itself (--host my-box.local) is always among them."""
    if given is None:
        given = ANY_HOST if listens_beyond_loopback(bind_host) else AllowedHosts()
    name = host_name(bind_host)
    if given.any_host or name is None or _is_unspecified(name):
        return given
    return replace(given, names=given.names | {name})


def _is_unspecified(name: str) -> bool:
    """0.0.0.0 or ::: an address to listen on every interface with, not one a client reaches."""
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


def listens_beyond_loopback(host: str) -> bool:
    """Whether binding `host` listens on an address other machines can connect to (not loopback only).
    A name that does not resolve counts as loopback: the bind reports it."""
    try:
        # No host at all ("") binds every interface, as AI_PASSIVE resolves it.
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    return any(not ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)
