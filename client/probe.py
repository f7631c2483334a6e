"""Does the SuperLink speak the way this site will dial it? Asked once, in seconds, before the SuperNode starts.

A SuperNode started with ``--insecure`` against a TLS SuperLink (or the reverse, or with the wrong CA)
retries forever without saying why; one TLS handshake on the port tells the three cases apart. A port
that does not answer yet is not an error: sites may start before the coordinator.
"""
from __future__ import annotations

import socket
import ssl
from pathlib import Path


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def superlink_mismatch(address: str, ca: Path | None, timeout: float = 5.0) -> str | None:
    """None if ``address`` answers as we will dial it (TLS verified by ``ca``; plain when ``ca`` is None)
    or does not answer at all; else a one-line reason."""
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None  # not up yet: the SuperNode keeps dialing
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None:  # we only ask whether it speaks TLS at all
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with sock:
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            return (f"{address} speaks TLS but its certificate is not trusted by {ca}: {exc.verify_message} "
                    f"(wrong ca.pem, or an address missing from the server certificate's SANs)")
        except (ssl.SSLError, ConnectionError) as exc:
            if ca is None:
                return None  # plain HTTP refused our handshake: as --insecure expects
            return f"{address} does not speak TLS ({type(exc).__name__}): was the server started with --insecure?"
        except OSError:
            return None  # a timeout or the like: no verdict, the SuperNode will say more
    if ca is None:
        return f"{address} speaks TLS: drop --insecure (the site then uses the federation's ca.pem and its key)"
    return None
