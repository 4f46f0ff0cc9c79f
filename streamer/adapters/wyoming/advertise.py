"""Zeroconf (mDNS/DNS-SD): the Wyoming service announced as ``_wyoming._tcp.local.``, which Home Assistant
browses for, with python-zeroconf.

The address announced is ``wyoming.host``; for a wildcard host (``0.0.0.0``, ``::``, empty) it is the address
this machine reaches the mDNS group from (the interface of its default route). The instance name is
``streamer-<host name>``; zeroconf picks another if the network has it already.
"""

from __future__ import annotations

import logging
import socket

from zeroconf import Error as ZeroconfError
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from streamer.errors import ConfigError

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
MDNS_GROUP = "224.0.0.251"
WILDCARDS = ("", "0.0.0.0", "::")


def announced_address(host: str) -> str:
    """The address to announce for a server bound to ``host``.

    Raises:
        ConfigError: the host is a wildcard and this machine has no route to the mDNS group (no network).
    """
    if host not in WILDCARDS:
        return host
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((MDNS_GROUP, 5353))  # no packet is sent: this only picks the outgoing interface
        return str(probe.getsockname()[0])
    except OSError as exc:
        raise ConfigError(f"wyoming.zeroconf: cannot tell which address to announce for host {host!r} ({exc}); "
                          "set wyoming.host to this machine's address on the network") from exc
    finally:
        probe.close()


class Advertisement:
    """The service's mDNS registration, from :meth:`start` until :meth:`close`.

    Args:
        host: the address the server is bound to.
        port: the port it listens on.
    """

    def __init__(self, host: str, port: int) -> None:
        self.address = announced_address(host)
        self.port = port
        self.name = f"streamer-{socket.gethostname().split('.')[0] or 'host'}"
        self.info = AsyncServiceInfo(SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}", port=port,
                                     parsed_addresses=[self.address])
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        """Announce the service; returns once it is announced (probing for a free name takes about a second).

        Raises:
            ConfigError: the announcement failed (no multicast network).
        """
        version = IPVersion.V6Only if ":" in self.address else IPVersion.V4Only
        try:
            self._zeroconf = AsyncZeroconf(ip_version=version)
            announced = await self._zeroconf.async_register_service(self.info, allow_name_change=True)
            await announced
        except (OSError, ZeroconfError) as exc:
            await self.close()
            raise ConfigError(f"wyoming.zeroconf: cannot announce {SERVICE_TYPE} at {self.address}:{self.port} "
                              f"({exc!r}); is this machine on a network with multicast?") from exc
        logger.info("wyoming: announced as %r (%s) at %s:%d over zeroconf", self.info.name, SERVICE_TYPE,
                    self.address, self.port)

    async def close(self) -> None:
        """Withdraw the announcement (goodbye packets) and stop answering mDNS."""
        if self._zeroconf is None:
            return
        zeroconf, self._zeroconf = self._zeroconf, None
        await zeroconf.async_unregister_all_services()
        await zeroconf.async_close()
